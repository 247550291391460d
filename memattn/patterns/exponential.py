"""Exponential (LogSparse) pattern: keys at power-of-two distances plus a local window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern
from ._tiles import diff_band_coo, merge_intervals

__all__ = ["Exponential", "exponential"]


@dataclass(frozen=True)
class Exponential(Pattern):
    """``|q_pos - kv_pos|`` is 0, a power of two, or ``<= local`` (symmetric)."""

    local: int = 0

    def mask(self, b, h, q_pos, kv_pos):
        d = torch.abs(q_pos - kv_pos)
        return ((d & (d - 1)) == 0) | (d <= self.local)

    def _coo(self, nq, nk, block_q, block_k):
        # O(log N) difference intervals: [-local, local] and ±2^j
        lo, hi = [-self.local], [self.local]
        p = 1
        while p <= nk + nq:
            lo += [p, -p]
            hi += [p, -p]
            p *= 2
        lo, hi = merge_intervals(lo, hi)
        return diff_band_coo(1, nq, nk, block_q, block_k, torch.tensor(lo), torch.tensor(hi))

    def __repr__(self) -> str:
        return f"exponential(local={self.local})"


def exponential(local: int = 0) -> Pattern:
    """LogSparse attention: keys at distance 0, 1, 2, 4, 8, … from the query, plus a window.

    Allowed iff ``d = |q_pos - kv_pos|`` is 0 or a power of two, or ``d <= local``.
    Symmetric; intersect with ``causal()`` for a decoder (LogSparse Transformer).

    Args:
        local: half-width of an always-allowed band (int >= 0).
    Returns:
        an :class:`Exponential` pattern.

    Example:
        >>> from memattn import patterns
        >>> patterns.exponential().dense(1, 10).int().tolist()
        [[0, 1, 0, 0, 0, 1, 0, 1, 1, 1]]
    """
    if not isinstance(local, int) or isinstance(local, bool) or local < 0:
        raise ValueError(f"local must be a non-negative int, got {local!r}")
    return Exponential(local)
