"""Document masking for packed sequences: attend within the same document only."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch

from .base import Pattern, block_bounds
from .blockmap import BlockCOO, _cdiv
from ._tiles import cdiv_t, fdiv, tile_bounds

__all__ = ["Document", "document"]


@functools.lru_cache(maxsize=32)
def _bounds(lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) int64 of each document, ends exclusive."""
    ends = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return ends - torch.tensor(lengths, dtype=torch.int64), ends


@dataclass(frozen=True)
class Document(Pattern):
    """Same document: positions [0, sum(lengths)) are split into consecutive documents of the
    given lengths; a pair is allowed iff both positions lie in the same one.

    A problem with nk > sum(lengths) raises (ValueError naming nk) in ``dense``,
    ``block_map``, ``density`` and ``for_sizes``; ``mask`` itself is total and returns False
    for positions outside [0, sum(lengths)) (negative query positions, when nq > nk, belong
    to no document)."""

    lengths: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def for_sizes(self, nq: int, nk: int) -> Pattern:
        if nk > self.total:
            raise ValueError(f"nk={nk} exceeds the {self.total} positions covered by the document lengths")
        return self

    def doc_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """int64 document index of each position (-1 outside [0, sum(lengths)))."""
        _, ends = _bounds(self.lengths)
        pos = torch.as_tensor(pos, dtype=torch.int64)
        ids = torch.searchsorted(ends, pos, right=True)
        return torch.where((pos >= 0) & (pos < self.total), ids, torch.full_like(ids, -1))

    def mask(self, b, h, q_pos, kv_pos):
        dq, dk = self.doc_ids(q_pos), self.doc_ids(kv_pos)
        return (dq == dk) & (dq >= 0)

    def _ranges(self, nq: int, nk: int, block_q: int, block_k: int) -> tuple[torch.Tensor, ...]:
        """Per query block: key blocks [lo, hi) and full ones [f_lo, f_hi)."""
        self.for_sizes(nq, nk)
        kb_n = _cdiv(nk, block_k)
        starts, ends = _bounds(self.lengths)
        qf, ql = block_bounds(nq, block_q, nk - nq)
        live = ql >= 0                                      # tiles with a query at position >= 0
        no_neg = qf >= 0                                    # no query outside every document
        qf = torch.clamp(qf, min=0)
        ql = torch.clamp(ql, min=0)
        d0 = torch.searchsorted(ends, qf, right=True)
        d1 = torch.searchsorted(ends, ql, right=True)
        k_lo = starts[d0]
        k_hi = torch.clamp(ends[d1], max=nk) - 1            # inclusive
        lo = fdiv(k_lo, block_k)
        hi = torch.where(live, fdiv(k_hi, block_k) + 1, lo)
        # full: the queries share one document and the key tile lies inside it
        one = (d0 == d1) & live & no_neg
        f_lo = cdiv_t(k_lo, block_k)
        f_hi = torch.where(k_hi == nk - 1, torch.full_like(k_hi, kb_n), fdiv(k_hi + 1, block_k))
        f_hi = torch.where(one, f_hi, f_lo)
        return lo, hi, f_lo, f_hi

    def _coo(self, nq, nk, block_q, block_k):
        lo, hi, f_lo, f_hi = self._ranges(nq, nk, block_q, block_k)
        return BlockCOO.from_ranges(1, _cdiv(nq, block_q), _cdiv(nk, block_k), lo, hi, f_lo, f_hi)

    _restrictable = True

    def _nnz_hint(self, nq, nk, block_q, block_k):
        lo, hi, _, _ = self._ranges(nq, nk, block_q, block_k)
        return int((hi - lo).clamp(min=0).sum())

    def _restrict(self, coo, nq, nk, block_q, block_k):
        _, qf, ql, kf, kl = tile_bounds(coo, nq, nk, block_q, block_k)
        _, ends = _bounds(self.lengths)
        live = ql >= 0
        dq0 = torch.searchsorted(ends, torch.clamp(qf, min=0), right=True)
        dq1 = torch.searchsorted(ends, torch.clamp(ql, min=0), right=True)
        dk0 = torch.searchsorted(ends, kf, right=True)
        dk1 = torch.searchsorted(ends, kl, right=True)
        keep = live & (dq0 <= dk1) & (dk0 <= dq1)           # the tile's query and key documents meet
        full = coo.full & (qf >= 0) & (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0)
        return coo.select(keep, full)

    def __repr__(self) -> str:
        if len(self.lengths) <= 8:
            return f"document(lengths={self.lengths})"
        return f"document(lengths=({self.lengths[0]}, {self.lengths[1]}, …): {len(self.lengths)} documents, {self.total} positions)"


def document(lengths: Iterable[int]) -> Pattern:
    """Packed sequences: each position attends only to positions of its own document.

    Documents are consecutive: document d covers positions
    [sum(lengths[:d]), sum(lengths[:d+1])). Allowed iff both positions are in the same one.
    The problem must fit: nk <= sum(lengths) (an nk beyond raises ValueError; a shorter nk
    cuts the last documents). Intersect with ``causal()`` for a decoder.

    Args:
        lengths: positive ints, the document lengths in order.
    Returns:
        a :class:`Document` pattern.

    Example:
        >>> from memattn import patterns
        >>> patterns.document([2, 3]).dense(5, 5).int().tolist()
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    """
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.reshape(-1).tolist()
    try:
        vals = tuple(lengths)
    except TypeError:
        raise TypeError(f"lengths must be a sequence of ints, got {type(lengths).__name__}") from None
    if not vals:
        raise ValueError("lengths must not be empty")
    for v in vals:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"lengths must be positive ints, got {v!r}")
    return Document(vals)
