"""Sparse Transformer "fixed" pattern: own block plus the summary keys of every block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, block_bounds
from .blockmap import BlockCOO, _cdiv
from . import _tiles
from ._tiles import fdiv, tile_bounds

__all__ = ["Fixed", "fixed"]


@dataclass(frozen=True)
class Fixed(Pattern):
    """``q_pos // block == kv_pos // block`` or ``kv_pos % block >= block - summary``."""

    block: int
    summary: int = 1

    def mask(self, b, h, q_pos, kv_pos):
        same = fdiv(q_pos, self.block) == fdiv(kv_pos, self.block)
        return same | (torch.remainder(kv_pos, self.block) >= self.block - self.summary)

    def _first_summary(self, a: torch.Tensor) -> torch.Tensor:
        # first summary key position >= a
        r = torch.remainder(a, self.block)
        s0 = self.block - self.summary
        return torch.where(r >= s0, a, a + (s0 - r))

    def _first_plain(self, a: torch.Tensor) -> torch.Tensor:
        # first non-summary key position >= a (summary < block)
        r = torch.remainder(a, self.block)
        s0 = self.block - self.summary
        return torch.where(r < s0, a, a + (self.block - r))

    def _last_plain(self, b: torch.Tensor) -> torch.Tensor:
        r = torch.remainder(b, self.block)
        s0 = self.block - self.summary
        return torch.where(r < s0, b, b - r + s0 - 1)

    def _coo(self, nq, nk, block_q, block_k):
        qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
        if self.summary >= self.block:
            z = torch.zeros(qb_n, dtype=torch.int64)
            return BlockCOO.from_ranges(1, qb_n, kb_n, z, z + kb_n, z, z + kb_n)
        qf_all, ql_all = block_bounds(nq, block_q, nk - nq)
        kf, kl = block_bounds(nk, block_k)
        cols = torch.nonzero(self._first_summary(kf) <= kl).flatten()   # key tiles holding a summary key
        step = max(1, _tiles._CHUNK // max(1, cols.numel()))
        keys, fulls = [], []
        for t0 in range(0, qb_n, step):                     # chunks of query tiles, in key order
            t1 = min(qb_n, t0 + step)
            n_t = t1 - t0
            qf, ql = qf_all[t0:t1], ql_all[t0:t1]
            # (1) same block: a tile's queries span blocks [fb0, fb1] -> the keys of those blocks
            k_lo = torch.clamp(fdiv(qf, self.block) * self.block, min=0)
            k_hi = torch.clamp((fdiv(ql, self.block) + 1) * self.block - 1, max=nk - 1)
            lo = fdiv(k_lo, block_k)
            hi = torch.where(k_hi >= k_lo, fdiv(k_hi, block_k) + 1, lo)
            own = BlockCOO.from_ranges(1, n_t, kb_n, lo, hi)
            # (2) summary columns, for every query tile
            t = torch.arange(n_t, dtype=torch.int64)
            col = BlockCOO.from_entries(1, n_t, kb_n, torch.zeros(n_t * cols.numel(), dtype=torch.int64),
                                        t.repeat_interleave(cols.numel()), cols.repeat(n_t),
                                        torch.zeros(n_t * cols.numel(), dtype=torch.bool))
            coo = own.union(col)
            coo = BlockCOO(1, qb_n, kb_n, coo.key + t0 * kb_n, coo.full)   # rows t0.. of the whole map
            # exact fullness: every non-summary key of the key tile lies in the one block that
            # holds all the tile's queries
            _, qf_e, ql_e, kf_e, kl_e = tile_bounds(coo, nq, nk, block_q, block_k)
            p0, p1 = self._first_plain(kf_e), self._last_plain(kl_e)
            qblk = fdiv(qf_e, self.block)
            one_block = ((qblk == fdiv(ql_e, self.block)) & (fdiv(p0, self.block) == qblk)
                         & (fdiv(p1, self.block) == qblk))
            keys.append(coo.key)
            fulls.append((p0 > kl_e) | one_block)
        return BlockCOO(1, qb_n, kb_n, torch.cat(keys), torch.cat(fulls))

    def __repr__(self) -> str:
        return f"fixed(block={self.block}, summary={self.summary})"


def fixed(block: int, summary: int = 1) -> Pattern:
    """Sparse Transformer "fixed" attention: the query's own block plus the last ``summary``
    keys of every block.

    Allowed iff ``q_pos // block == kv_pos // block`` or ``kv_pos % block >= block - summary``
    (blocks of absolute positions; symmetric: intersect with ``causal()`` for a decoder).

    Args:
        block: block length (int >= 1).
        summary: summary keys at the end of each block (1 <= summary <= block).
    Returns:
        a :class:`Fixed` pattern.

    Example:
        >>> from memattn import patterns
        >>> patterns.fixed(3).dense(1, 9).int().tolist()
        [[0, 0, 1, 0, 0, 1, 1, 1, 1]]
    """
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if not isinstance(summary, int) or isinstance(summary, bool) or not 1 <= summary <= block:
        raise ValueError(f"summary must be an int in [1, block={block}], got {summary!r}")
    return Fixed(block, summary)
