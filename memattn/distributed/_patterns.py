"""Patterns seen through a shard: shifted positions (ring) and a slice of heads (Ulysses).

A ring step computes one (query chunk, key chunk) pair with ``memattn.attention`` on
local tensors, whose positions start at 0. The global pattern must then be evaluated at
``global = local + offset``; :func:`shift` builds that pattern, keeping an analytic
block map for sliding windows (and their ``&``/``|``) and evaluating the predicate for
anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import Pattern
from ..patterns.base import Intersection, Union
from ..patterns.blockmap import BlockCOO
from ..patterns.local import Full, SlidingWindow

__all__ = ["Shifted", "HeadSlice", "shift", "translation_invariant"]


def translation_invariant(p: Pattern) -> bool:
    """True when the predicate depends on q_pos − kv_pos only (windows, full, and combinations)."""
    if isinstance(p, (SlidingWindow, Full)):
        return True
    if isinstance(p, (Intersection, Union)):
        return translation_invariant(p.a) and translation_invariant(p.b)
    return False


def _shift_sw(p: SlidingWindow, delta: int) -> SlidingWindow:
    # global d = (q + qo) - (k + ko) = d_local + delta: d <= left  <=>  d_local <= left - delta
    def sub(v, s):
        return tuple(x + s for x in v) if isinstance(v, tuple) else v + s
    return SlidingWindow(sub(p.left, -delta), sub(p.right, delta))


@dataclass(frozen=True)
class Shifted(Pattern):
    """``base`` evaluated at (q_pos + q_offset, kv_pos + k_offset).

    ``q_pos`` is the local (bottom-right aligned) query position, so the local pair
    (i, j) maps to the global pair (i + nk − nq + q_offset, j + k_offset).
    """

    base: Pattern
    q_offset: int
    k_offset: int

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return self.base.num_heads

    def mask(self, b, h, q_pos, kv_pos):
        return self.base.mask(b, h, q_pos + self.q_offset, kv_pos + self.k_offset)

    def _coo(self, nq: int, nk: int, block_q: int, block_k: int) -> BlockCOO:
        return _shifted_coo(self.base, self.q_offset, self.k_offset, nq, nk, block_q, block_k)

    def __repr__(self) -> str:
        return f"shifted({self.base!r}, q_offset={self.q_offset}, k_offset={self.k_offset})"


def _shifted_coo(p: Pattern, qo: int, ko: int, nq: int, nk: int, bq: int, bk: int) -> BlockCOO:
    if isinstance(p, SlidingWindow):
        return _shift_sw(p, qo - ko)._coo(nq, nk, bq, bk)
    if isinstance(p, Full):
        return p._coo(nq, nk, bq, bk)
    if isinstance(p, Intersection):
        return _shifted_coo(p.a, qo, ko, nq, nk, bq, bk).intersection(_shifted_coo(p.b, qo, ko, nq, nk, bq, bk))
    if isinstance(p, Union):
        return _shifted_coo(p.a, qo, ko, nq, nk, bq, bk).union(_shifted_coo(p.b, qo, ko, nq, nk, bq, bk))
    if isinstance(p, Shifted):
        return _shifted_coo(p.base, qo + p.q_offset, ko + p.k_offset, nq, nk, bq, bk)
    return Shifted(p, qo, ko)._coo_by_evaluation(nq, nk, bq, bk)


def shift(p: Pattern, q_offset: int, k_offset: int) -> Pattern:
    """The pattern a local call must use so that local positions + offsets hit ``p``.

    Returns ``p`` itself when nothing moves, a plain :class:`SlidingWindow` when the
    shifted window is still an ordinary one (both sides >= 0), else a :class:`Shifted`.

    Example:
        >>> from memattn import patterns
        >>> shift(patterns.sliding_window(10), 8, 0)
        sliding_window(left=2, right=8)
    """
    delta = q_offset - k_offset
    if delta == 0 and translation_invariant(p):
        return p
    if isinstance(p, SlidingWindow):
        s = _shift_sw(p, delta)
        vals = [v for side in (s.left, s.right) for v in (side if isinstance(side, tuple) else (side,))]
        if min(vals) >= 0:
            return s
    return Shifted(p, q_offset, k_offset)


@dataclass(frozen=True)
class HeadSlice(Pattern):
    """Heads [start, start + count) of a per-head pattern, renumbered from 0 (Ulysses)."""

    base: Pattern
    start: int
    count: int

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return self.count

    def mask(self, b, h, q_pos, kv_pos):
        return self.base.mask(b, torch.as_tensor(h) + self.start, q_pos, kv_pos)

    def _coo(self, nq: int, nk: int, block_q: int, block_k: int) -> BlockCOO:
        coo = self.base._coo(nq, nk, block_q, block_k)
        if coo.heads == 1:
            coo = coo.broadcast_heads(self.start + self.count)
        per_head = coo.num_q_blocks * coo.num_kv_blocks
        head = coo.key // per_head
        keep = (head >= self.start) & (head < self.start + self.count)
        return BlockCOO(self.count, coo.num_q_blocks, coo.num_kv_blocks,
                        coo.key[keep] - self.start * per_head, coo.full[keep])

    def __repr__(self) -> str:
        return f"heads({self.base!r}, {self.start}:{self.start + self.count})"
