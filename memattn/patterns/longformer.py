"""Longformer: a symmetric sliding window plus global tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .base import Pattern
from .local import _as_per_head, _head_values
from .global_tokens import _is_global, _short, as_positions, global_coo
from ._tiles import diff_band_coo

__all__ = ["Longformer", "longformer"]


@dataclass(frozen=True)
class Longformer(Pattern):
    """``|q_pos - kv_pos| <= window // 2`` or q_pos or kv_pos is global.

    ``window`` may be a per-head tuple."""

    window: int | tuple[int, ...]
    global_indices: tuple[int, ...] = ()

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return len(self.window) if isinstance(self.window, tuple) else None

    def mask(self, b, h, q_pos, kv_pos):
        half = torch.div(_head_values(self.window, h), 2, rounding_mode="floor")
        near = torch.abs(q_pos - kv_pos) <= half
        return near | _is_global(self.global_indices, q_pos) | _is_global(self.global_indices, kv_pos)

    def _coo(self, nq, nk, block_q, block_k):
        heads = self.heads
        half = torch.div(_head_values(self.window, torch.arange(heads)), 2, rounding_mode="floor")
        half = half.reshape(-1).expand(heads)
        band = diff_band_coo(heads, nq, nk, block_q, block_k, -half[:, None], half[:, None])
        return global_coo(heads, nq, nk, block_q, block_k, self.global_indices, band, half)

    def __repr__(self) -> str:
        return f"longformer(window={self.window}, global_indices={_short(self.global_indices)})"


def longformer(window: int | tuple[int, ...], global_indices: Iterable[int] = ()) -> Pattern:
    """Longformer attention: a symmetric window of ``window // 2`` keys on each side plus
    global tokens (attending to all and attended by all).

    Allowed iff ``|q_pos - kv_pos| <= window // 2`` or ``q_pos`` or ``kv_pos`` is in
    ``global_indices`` (absolute positions).

    Args:
        window: total window width (int >= 0, or one per head).
        global_indices: non-negative ints (may be empty).
    Returns:
        a :class:`Longformer` pattern.

    Example:
        >>> from memattn import patterns
        >>> patterns.longformer(2, [0]).dense(4, 4).int().tolist()
        [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]]
    """
    return Longformer(_as_per_head(window, "window"), as_positions(global_indices, "global_indices", allow_empty=True))
