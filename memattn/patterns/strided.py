"""Strided pattern (Sparse Transformer "strided", generalised to several strides)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, block_bounds
from .blockmap import BlockCOO, _cdiv
from ._tiles import diff_band_coo, fdiv, merge_intervals

__all__ = ["Strided", "strided"]


@dataclass(frozen=True)
class Strided(Pattern):
    """``|q_pos - kv_pos| % s == 0`` for some stride s, or ``|q_pos - kv_pos| <= local``
    (symmetric: intersect with ``causal()`` for a decoder)."""

    strides: tuple[int, ...]
    local: int = 0

    def mask(self, b, h, q_pos, kv_pos):
        d = torch.abs(q_pos - kv_pos)
        out = d <= self.local
        for s in self.strides:
            out = out | (torch.remainder(d, s) == 0)
        return out

    def _coo(self, nq, nk, block_q, block_k):
        qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
        d_min, d_max = (nk - nq) - (nk - 1), nk - 1           # range of q_pos - kv_pos
        if 1 in self.strides:
            z = torch.zeros(qb_n, dtype=torch.int64)
            return BlockCOO.from_ranges(1, qb_n, kb_n, z, z + kb_n, z, z + kb_n)
        n_int = sum((d_max - d_min) // s + 1 for s in self.strides)
        if n_int <= 2 * kb_n:
            # sparse case: one difference interval per multiple of a stride, plus the band
            lo, hi = [-self.local], [self.local]
            for s in self.strides:
                j0, j1 = -(-d_min // s), d_max // s
                ms = list(range(j0 * s, j1 * s + 1, s))
                lo += ms
                hi += ms
            lo, hi = merge_intervals(lo, hi)
            return diff_band_coo(1, nq, nk, block_q, block_k, torch.tensor(lo), torch.tensor(hi))
        return self._coo_dense_tiles(nq, nk, block_q, block_k)

    def _coo_dense_tiles(self, nq: int, nk: int, block_q: int, block_k: int) -> BlockCOO:
        # small strides touch nearly every tile: test each tile's difference range
        # [q_first - k_last, q_last - k_first] (every integer in it occurs) row of tiles by row.
        qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
        qf, ql = block_bounds(nq, block_q, nk - nq)
        kf, kl = block_bounds(nk, block_k)
        keys, fulls = [], []
        rows = max(1, (1 << 22) // kb_n)
        for t0 in range(0, qb_n, rows):
            t = torch.arange(t0, min(qb_n, t0 + rows), dtype=torch.int64)
            lo = qf[t, None] - kl[None, :]
            hi = ql[t, None] - kf[None, :]
            hit = (lo <= self.local) & (hi >= -self.local)
            for s in self.strides:
                hit |= fdiv(hi, s) * s >= lo
            full = ((lo >= -self.local) & (hi <= self.local)) | (
                (lo == hi) & _in_set(lo, self.strides, self.local))
            ti, ui = torch.nonzero(hit, as_tuple=True)
            keys.append((t[ti]) * kb_n + ui)
            fulls.append(full[ti, ui])
        return BlockCOO(1, qb_n, kb_n, torch.cat(keys), torch.cat(fulls))

    def __repr__(self) -> str:
        args = ", ".join(str(s) for s in self.strides)
        return f"strided({args}, local={self.local})"


def _in_set(d: torch.Tensor, strides: tuple[int, ...], local: int) -> torch.Tensor:
    a = torch.abs(d)
    out = a <= local
    for s in strides:
        out = out | (torch.remainder(a, s) == 0)
    return out


def strided(*strides: int, local: int = 0) -> Pattern:
    """Keys at a multiple of some stride from the query, or within ``local`` of it.

    Allowed iff ``|q_pos - kv_pos| % s == 0`` for some s in ``strides``, or
    ``|q_pos - kv_pos| <= local``. Symmetric; ``strided(s) & causal()`` is the Sparse
    Transformer's strided head. Several strides (e.g. distinct primes) reach more keys with
    little aliasing.

    Args:
        *strides: one or more positive ints.
        local: half-width of an always-allowed band (int >= 0).
    Returns:
        a :class:`Strided` pattern.

    Example:
        >>> from memattn import patterns
        >>> patterns.strided(3).dense(1, 7).int().tolist()
        [[1, 0, 0, 1, 0, 0, 1]]
    """
    if not strides:
        raise ValueError("strides must not be empty: give at least one stride")
    for s in strides:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"strides must be positive ints, got {strides!r}")
    if not isinstance(local, int) or isinstance(local, bool) or local < 0:
        raise ValueError(f"local must be a non-negative int, got {local!r}")
    return Strided(tuple(sorted(set(strides))), local)
