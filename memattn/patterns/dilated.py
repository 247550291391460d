"""Dilated sliding window: every ``dilation``-th key inside a window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern
from .blockmap import BlockCOO, _cdiv
from .local import _as_per_head, _head_values
from ._tiles import diff_band_coo, fdiv, tile_bounds

__all__ = ["Dilated", "dilated"]


@dataclass(frozen=True)
class Dilated(Pattern):
    """``q_pos - left <= kv_pos <= q_pos + right`` and ``(q_pos - kv_pos) % dilation == 0``.

    Each of ``left``, ``right``, ``dilation`` is an int or a per-head tuple.
    """

    left: int | tuple[int, ...]
    dilation: int | tuple[int, ...]
    right: int | tuple[int, ...] = 0

    def __post_init__(self) -> None:
        counts = {len(v) for v in (self.left, self.dilation, self.right) if isinstance(v, tuple)}
        if len(counts) > 1:
            raise ValueError(f"left, dilation and right give different head counts ({sorted(counts)})")

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        for v in (self.left, self.dilation, self.right):
            if isinstance(v, tuple):
                return len(v)
        return None

    def mask(self, b, h, q_pos, kv_pos):
        d = q_pos - kv_pos
        return ((d <= _head_values(self.left, h)) & (-d <= _head_values(self.right, h))
                & (torch.remainder(d, _head_values(self.dilation, h)) == 0))

    def _coo(self, nq, nk, block_q, block_k):
        heads = self.heads
        hs = torch.arange(heads)
        left = _head_values(self.left, hs).reshape(-1, 1).expand(heads, 1)
        right = _head_values(self.right, hs).reshape(-1, 1).expand(heads, 1)
        dil = _head_values(self.dilation, hs).reshape(-1).expand(heads)
        band = diff_band_coo(heads, nq, nk, block_q, block_k, -right, left)
        if band.key.numel() == 0:
            return band
        head, qf, ql, kf, kl = tile_bounds(band, nq, nk, block_q, block_k)
        d_lo, d_hi = qf - kl, ql - kf                       # every difference in between occurs
        lo = torch.maximum(d_lo, -right[head, 0])
        hi = torch.minimum(d_hi, left[head, 0])
        dh = dil[head]
        keep = fdiv(hi, dh) * dh >= lo                      # a multiple of the dilation in [lo, hi]
        full = band.full & ((dh == 1) | ((d_lo == d_hi) & (torch.remainder(d_lo, dh) == 0)))
        return band.select(keep, full)

    def __repr__(self) -> str:
        return f"dilated(left={self.left}, dilation={self.dilation}, right={self.right})"


def dilated(left: int | tuple[int, ...], dilation: int | tuple[int, ...],
            right: int | tuple[int, ...] = 0) -> Pattern:
    """Every ``dilation``-th key of the window ``[q_pos - left, q_pos + right]``.

    Allowed iff ``q_pos - left <= kv_pos <= q_pos + right`` and
    ``(q_pos - kv_pos) % dilation == 0`` (so the query always sees itself).

    Args:
        left: keys before the query (int >= 0, or one per head).
        dilation: key spacing (int >= 1, or one per head); 1 is ``sliding_window``.
        right: keys after the query (default 0, causal).
    Returns:
        a :class:`Dilated` pattern (per-head when any argument is a tuple).

    Example:
        >>> from memattn import patterns
        >>> patterns.dilated(4, 2).dense(5, 5).int().tolist()
        [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
    """
    d = _as_per_head(dilation, "dilation")
    for v in (d if isinstance(d, tuple) else (d,)):
        if v < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation!r}")
    return Dilated(_as_per_head(left, "left"), d, _as_per_head(right, "right"))
