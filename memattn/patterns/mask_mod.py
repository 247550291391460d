"""Patterns from a FlexAttention-style ``mask_mod`` callable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .base import Pattern

__all__ = ["MaskMod", "from_mask_mod"]

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskMod(Pattern):
    """``fn(b, h, q_pos, kv_pos)`` (True = attend) on absolute positions.

    The block map is found by evaluating ``fn`` tile row by tile row (O(nq·nk) work,
    O(block_q·nk) memory, cached per sizes): for every head when ``heads`` is given (else at
    h = 0), and as the union over batch indices 0..batch_size-1 (else at b = 0). Hashable by
    the identity of ``fn``."""

    fn: MaskFn
    head_count: int | None = None
    batch_size: int = 1

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return self.head_count

    def mask(self, b, h, q_pos, kv_pos):
        out = self.fn(b, h, q_pos, kv_pos)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if out.dtype != torch.bool:
            raise TypeError(f"mask_mod {self._name()} must return a bool tensor, got {out.dtype}")
        return out

    def _coo(self, nq, nk, block_q, block_k):
        return self._coo_by_evaluation(nq, nk, block_q, block_k, batches=self.batch_size)

    def _name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def __repr__(self) -> str:
        extra = "" if self.head_count is None else f", num_heads={self.head_count}"
        extra += "" if self.batch_size == 1 else f", batch_size={self.batch_size}"
        return f"from_mask_mod({self._name()}{extra})"


def from_mask_mod(fn: MaskFn, num_heads: int | None = None, batch_size: int = 1) -> Pattern:
    """A pattern from any predicate ``fn(b, h, q_pos, kv_pos) -> bool tensor``, as
    FlexAttention's ``mask_mod``.

    ``fn`` receives int64 tensors that broadcast together (b and h may be 0-dim or shaped
    like (B, 1, 1, 1) / (1, H, 1, 1)); positions are absolute (query i at i + nk - nq).

    Head- and batch-dependent predicates: the block map is computed at h = 0 unless
    ``num_heads`` is given (then per head, and the pattern has ``num_heads`` heads), and at
    b = 0 unless ``batch_size`` is given (then it is the union over b = 0..batch_size-1: a
    tile is listed if any batch needs it and full only if full for every batch). Kernels
    evaluate ``fn`` with the real batch index in partial tiles, so a batch-dependent ``fn``
    is exact as long as every batch's pairs lie in the union map; a head-dependent ``fn``
    without ``num_heads`` is a usage error that the block map cannot detect.

    Args:
        fn: the predicate (a plain function, lambda or callable object; identity is the hash).
        num_heads: number of heads the predicate varies over (int >= 1), or None.
        batch_size: batches the block map must cover (int >= 1).
    Returns:
        a :class:`MaskMod` pattern.

    Example:
        >>> from memattn import patterns
        >>> def prefix_lm(b, h, q, k):
        ...     return (k <= q) | (k < 2)
        >>> patterns.from_mask_mod(prefix_lm).dense(4, 4).int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if num_heads is not None and (not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1):
        raise ValueError(f"num_heads must be a positive int or None, got {num_heads!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return MaskMod(fn, num_heads, batch_size)
