"""BigBird: block-level window, global blocks and random blocks."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .base import Pattern
from .blockmap import _cdiv
from ._tiles import coarsen_blocks, fdiv, sample_distinct, stream_of

__all__ = ["BigBird", "bigbird"]

_SALT = 0x42494742  # "BIGB"


@functools.lru_cache(maxsize=16)
def _random_rows(block_size: int, window_blocks: int, global_blocks: int, random_blocks: int, seed: int,
                 nb: int, p_lo: int, p_hi: int) -> torch.Tensor:
    """int64 (p_hi - p_lo + 1, random_blocks): the random key blocks of query blocks
    p_lo..p_hi (ascending per row, -1 padded); none for global blocks."""
    hw = window_blocks // 2
    g1, g2 = (global_blocks + 1) // 2, global_blocks // 2
    p = torch.arange(p_lo, p_hi + 1, dtype=torch.int64)
    c0 = min(g1, nb)
    c1 = max(nb - g2, c0)                                   # candidates: [c0, c1) minus the window
    h_lo = torch.clamp(p - hw, min=c0)
    h_hi = torch.clamp(p + hw, max=c1 - 1)
    hole = torch.clamp(h_hi - h_lo + 1, min=0)
    is_global = ((p >= 0) & (p < g1)) | ((p >= nb - g2) & (p < nb))
    n = torch.where(is_global, torch.zeros_like(p), (c1 - c0) - hole)
    u = sample_distinct(stream_of(seed, nb, window_blocks, global_blocks, _SALT), p, n, random_blocks)
    x = u + c0
    x = torch.where((hole[:, None] > 0) & (x >= h_lo[:, None]), x + hole[:, None], x)
    return torch.where(u >= 0, x, torch.full_like(x, -1))


@dataclass(frozen=True)
class BigBird(Pattern):
    """Block-level pattern over blocks of ``block_size`` absolute positions
    (qb = q_pos // block_size, kb = kv_pos // block_size, nb = ceil(nk / block_size) key
    blocks, the last one partial): allowed iff ``|qb - kb| <= window_blocks // 2``, or qb or
    kb is global (the first ceil(g/2) and last floor(g/2) of the nb blocks), or kb is one of
    the ``random_blocks`` blocks drawn for qb outside its window and the globals.

    The globals and draws depend on nk: ``mask`` needs the pattern bound by
    ``for_sizes(nq, nk)`` (``dense``, ``block_map``, ``density`` do it)."""

    block_size: int = 64
    window_blocks: int = 3
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0
    nk: int | None = None

    def for_sizes(self, nq: int, nk: int) -> Pattern:
        return self if self.nk == nk else replace(self, nk=nk)

    def _globals(self, nb: int) -> torch.Tensor:
        g1, g2 = (self.global_blocks + 1) // 2, self.global_blocks // 2
        g = sorted(set(range(min(g1, nb))) | set(range(max(nb - g2, 0), nb)))
        return torch.tensor(g, dtype=torch.int64)

    def _rows(self, nb: int, p_lo: int, p_hi: int) -> torch.Tensor:
        return _random_rows(self.block_size, self.window_blocks, self.global_blocks, self.random_blocks,
                            self.seed, nb, p_lo, p_hi)

    def random_block_table(self, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query blocks, their random key blocks): int64 (R,) and (R, random_blocks), -1 padded,
        for the query blocks of an (nq, nk) problem."""
        nb = _cdiv(nk, self.block_size)
        p_lo = (nk - nq) // self.block_size
        return torch.arange(p_lo, nb, dtype=torch.int64), self._rows(nb, p_lo, nb - 1)

    def mask(self, b, h, q_pos, kv_pos):
        if self.nk is None:
            raise ValueError(f"{self!r} depends on the number of keys: call pattern.for_sizes(nq, nk).mask(...)")
        bs = self.block_size
        nb = _cdiv(self.nk, bs)
        q_pos, kv_pos = torch.broadcast_tensors(torch.as_tensor(q_pos), torch.as_tensor(kv_pos))
        qb, kb = fdiv(q_pos, bs), fdiv(kv_pos, bs)
        glob = self._globals(nb)
        out = (torch.abs(qb - kb) <= self.window_blocks // 2) | torch.isin(qb, glob) | torch.isin(kb, glob)
        if self.random_blocks and q_pos.numel():
            p_lo, p_hi = int(qb.min()), int(qb.max())
            table = self._rows(nb, p_lo, p_hi)
            flat = (torch.arange(table.shape[0], dtype=torch.int64)[:, None] * nb + table)[table >= 0]
            if flat.numel():
                want = (qb - p_lo) * nb + torch.clamp(kb, 0, nb - 1)
                idx = torch.searchsorted(flat, want.reshape(-1)).clamp(max=flat.numel() - 1)
                out = out | (flat[idx] == want.reshape(-1)).reshape(want.shape)
        return out & (kv_pos >= 0) & (kv_pos < self.nk)

    def _coo(self, nq, nk, block_q, block_k):
        bs = self.block_size
        nb = _cdiv(nk, bs)
        p_lo = (nk - nq) // bs
        p = torch.arange(p_lo, nb, dtype=torch.int64)
        hw = self.window_blocks // 2
        glob = self._globals(nb)
        off = torch.arange(-hw, hw + 1, dtype=torch.int64)
        qs = [p.repeat_interleave(off.numel()), ]
        ks = [(p[:, None] + off[None, :]).reshape(-1)]
        g_rows = glob[glob >= p_lo]
        all_k = torch.arange(nb, dtype=torch.int64)
        qs += [g_rows.repeat_interleave(nb), p.repeat_interleave(glob.numel())]
        ks += [all_k.repeat(g_rows.numel()), glob.repeat(p.numel())]
        if self.random_blocks:
            table = self._rows(nb, p_lo, nb - 1)
            ok = table >= 0
            qs.append(p[:, None].expand_as(table)[ok])
            ks.append(table[ok])
        qblk, kblk = torch.cat(qs), torch.cat(ks)
        return coarsen_blocks(1, nq, nk, block_q, block_k, bs, torch.zeros_like(qblk), qblk, kblk)

    def __repr__(self) -> str:
        sized = "" if self.nk is None else f" for nk={self.nk}"
        return (f"bigbird(block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"global_blocks={self.global_blocks}, random_blocks={self.random_blocks}, seed={self.seed}){sized}")


def bigbird(block_size: int = 64, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
            seed: int = 0) -> Pattern:
    """BigBird (ITC) attention on blocks of ``block_size`` positions.

    With qb = q_pos // block_size, kb = kv_pos // block_size and nb = ceil(nk / block_size)
    blocks (a last partial block is a block): allowed iff ``|qb - kb| <= window_blocks // 2``,
    or qb or kb is a global block (the first ceil(global_blocks / 2) and the last
    floor(global_blocks / 2) blocks: they attend to all and are attended by all), or kb is
    one of ``random_blocks`` key blocks drawn for qb uniformly among the blocks outside its
    window and the globals (fewer when fewer exist). Draws are a deterministic function of
    (seed, qb, nb), so a decoding query sees the last row of the full pattern.

    Args:
        block_size: positions per block (int >= 1).
        window_blocks: window width in blocks (int >= 0); ``// 2`` blocks on each side.
        global_blocks: number of global blocks (int >= 0).
        random_blocks: random key blocks per non-global query block (int >= 0).
        seed: the draw's seed (int >= 0).
    Returns:
        a :class:`BigBird` pattern (call ``for_sizes(nq, nk)`` before ``mask``).

    Example:
        >>> from memattn import patterns
        >>> p = patterns.bigbird(block_size=2, window_blocks=1, global_blocks=1, random_blocks=0)
        >>> p.dense(6, 6).int().tolist()
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1]]
    """
    for name, v, least in (("block_size", block_size, 1), ("window_blocks", window_blocks, 0),
                           ("global_blocks", global_blocks, 0), ("random_blocks", random_blocks, 0),
                           ("seed", seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    return BigBird(block_size, window_blocks, global_blocks, random_blocks, seed)
