"""Random pattern: each query attends to a fixed number of keys drawn at random."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .base import Pattern
from .blockmap import BlockCOO, _cdiv
from . import _tiles
from ._tiles import sample_distinct, stream_of

__all__ = ["Random", "random"]

_SALT = 0x52414E44  # "RAND"


@functools.lru_cache(maxsize=16)
def _rows(keys_per_query: int, seed: int, nk: int, p_lo: int, p_hi: int) -> torch.Tensor:
    """int64 (p_hi - p_lo + 1, min(k, nk)): sorted keys of the queries at positions p_lo..p_hi."""
    m = min(keys_per_query, nk)
    stream = stream_of(seed, nk, _SALT)
    out = torch.empty(p_hi - p_lo + 1, m, dtype=torch.int64)
    step = max(1, (1 << 20) // max(m, 1))                  # bound the sampler's temporaries
    for a in range(p_lo, p_hi + 1, step):
        b = min(p_hi + 1, a + step)
        out[a - p_lo:b - p_lo] = sample_distinct(stream, torch.arange(a, b, dtype=torch.int64), nk, m)
    return out


@dataclass(frozen=True)
class Random(Pattern):
    """Each query position draws ``min(keys_per_query, nk)`` distinct keys uniformly from
    [0, nk), as a deterministic function of (seed, query position, nk).

    The keys depend on nk, so ``mask`` needs the pattern bound to the problem:
    ``for_sizes(nq, nk)`` returns a copy with ``nk`` set (``dense``, ``block_map`` and
    ``density`` do it). A query's keys do not depend on nq: one query decoding against nk
    keys sees the last row of the (nk, nk) pattern.
    """

    keys_per_query: int
    seed: int = 0
    nk: int | None = None

    def for_sizes(self, nq: int, nk: int) -> Pattern:
        return self if self.nk == nk else replace(self, nk=nk)

    def mask(self, b, h, q_pos, kv_pos):
        if self.nk is None:
            raise ValueError(f"{self!r} draws its keys for a given number of keys: call "
                             "pattern.for_sizes(nq, nk).mask(...)")
        q_pos, kv_pos = torch.broadcast_tensors(torch.as_tensor(q_pos), torch.as_tensor(kv_pos))
        if q_pos.numel() == 0:
            return torch.zeros(q_pos.shape, dtype=torch.bool, device=q_pos.device)
        p_lo, p_hi = int(q_pos.min()), int(q_pos.max())
        table = _rows(self.keys_per_query, self.seed, self.nk, p_lo, p_hi)   # (P, m)
        m = table.shape[1]
        # flat sorted keys (row * nk + key); rows are sorted, so the whole vector is
        flat = (torch.arange(table.shape[0], dtype=torch.int64)[:, None] * self.nk + table).reshape(-1)
        flat = flat.to(q_pos.device)                # the draws are made on the CPU
        ok = (kv_pos >= 0) & (kv_pos < self.nk)
        want = ((q_pos - p_lo) * self.nk + torch.clamp(kv_pos, 0, self.nk - 1)).reshape(-1)
        if m == 0:
            return torch.zeros(q_pos.shape, dtype=torch.bool, device=q_pos.device)
        idx = torch.searchsorted(flat, want).clamp(max=flat.numel() - 1)
        return (flat[idx] == want).reshape(q_pos.shape) & ok

    def _coo(self, nq, nk, block_q, block_k):
        qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
        table = _rows(self.keys_per_query, self.seed, nk, nk - nq, nk - 1)     # row i = query i
        m = table.shape[1]
        # chunks of whole query tiles, in key order (bounds the temporaries)
        step = max(1, (_tiles._CHUNK * 4) // max(1, m * block_q)) * block_q
        keys, fulls = [], []
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            rows = torch.arange(i0, i1, dtype=torch.int64)[:, None].expand(i1 - i0, m).reshape(-1)
            tiles = (rows // block_q) * kb_n + table[i0:i1].reshape(-1) // block_k
            key, counts = torch.unique(tiles, return_counts=True)   # a row's keys are distinct
            t, u = key // kb_n, key % kb_n
            area = torch.clamp(nq - t * block_q, max=block_q) * torch.clamp(nk - u * block_k, max=block_k)
            keys.append(key)
            fulls.append(counts == area)
        return BlockCOO(1, qb_n, kb_n, torch.cat(keys), torch.cat(fulls))

    def __repr__(self) -> str:
        sized = "" if self.nk is None else f" for nk={self.nk}"
        return f"random(keys_per_query={self.keys_per_query}, seed={self.seed}){sized}"


def random(keys_per_query: int, seed: int = 0) -> Pattern:
    """Each query attends to exactly ``min(keys_per_query, nk)`` keys drawn at random.

    The keys of the query at absolute position p are a uniform draw without replacement
    from [0, nk), a deterministic function of (seed, p, nk) computed by a counter-based
    hash (any subset of rows can be drawn alone, so a decoding step sees the same keys as
    the last row of the full matrix). Different seeds give different draws. The explicit
    table costs O(nq · keys_per_query).

    Args:
        keys_per_query: keys per query (int >= 1).
        seed: the draw's seed (int >= 0).
    Returns:
        a :class:`Random` pattern; call ``for_sizes(nq, nk)`` before ``mask``.

    Example:
        >>> from memattn import patterns
        >>> patterns.random(3, seed=1).dense(4, 10).sum(dim=1).tolist()
        [3, 3, 3, 3]
    """
    if not isinstance(keys_per_query, int) or isinstance(keys_per_query, bool) or keys_per_query < 1:
        raise ValueError(f"keys_per_query must be a positive int, got {keys_per_query!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return Random(keys_per_query, seed)
