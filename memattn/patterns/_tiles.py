"""Shared machinery of the analytic block maps: tile geometry, difference bands, coarsening
of block-level patterns onto kernel tiles, runs of special positions, and seeded sampling.

Conventions: a *tile* is a (query block, key block) pair of the kernel's block sizes
(block_q, block_k); query tile t holds rows [t·block_q, min((t+1)·block_q, nq)), i.e. absolute
positions shifted by ``off = nk - nq``; key tile u holds positions [u·block_k, min(.., nk)).
Every helper is vectorised over tiles and never builds an (nq, nk) array.
"""

from __future__ import annotations

import torch

from .base import block_bounds
from .blockmap import BlockCOO, _cdiv

__all__ = [
    "fdiv", "cdiv_t", "diff_band_coo", "merge_intervals", "tile_bounds", "coarsen_blocks",
    "Runs", "uniform_ints", "sample_distinct",
]


# pieces of work (ranges or entries) handled at once by the chunked builders
_CHUNK = 1 << 18


def fdiv(a: torch.Tensor, b: int | torch.Tensor) -> torch.Tensor:
    """Floor division of int64 tensors."""
    return torch.div(a, b, rounding_mode="floor")


def cdiv_t(a: torch.Tensor, b: int) -> torch.Tensor:
    """Ceil division of an int64 tensor by a positive int."""
    return torch.div(a + b - 1, b, rounding_mode="floor")


# ----------------------------------------------------------------------------- geometry
def tile_bounds(coo: BlockCOO, nq: int, nk: int, block_q: int, block_k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every entry of ``coo``: (head, first query position, last query position,
    first key position, last key position), all int64 and inclusive."""
    head, t, u = coo.entries()
    off = nk - nq
    qf = t * block_q + off
    ql = torch.clamp((t + 1) * block_q, max=nq) - 1 + off
    kf = u * block_k
    kl = torch.clamp(kf + block_k, max=nk) - 1
    return head, qf, ql, kf, kl


def merge_intervals(lo: list[int], hi: list[int]) -> tuple[list[int], list[int]]:
    """Sort integer intervals [lo, hi] and merge overlapping *or adjacent* ones, so that an
    interval of integers lies inside the union iff it lies inside one merged interval."""
    pairs = sorted((a, b) for a, b in zip(lo, hi) if a <= b)
    out_lo: list[int] = []
    out_hi: list[int] = []
    for a, b in pairs:
        if out_hi and a <= out_hi[-1] + 1:
            out_hi[-1] = max(out_hi[-1], b)
        else:
            out_lo.append(a)
            out_hi.append(b)
    return out_lo, out_hi


def diff_band_coo(heads: int, nq: int, nk: int, block_q: int, block_k: int,
                  a: torch.Tensor, b: torch.Tensor) -> BlockCOO:
    """Tiles holding a pair whose difference ``q_pos - kv_pos`` lies in one of the intervals
    [a[h, m], b[h, m]] (per head h, M intervals; an interval with a > b is empty).

    A tile's pairs realise *every* integer difference in [q_first - k_last, q_last - k_first],
    so a tile is listed iff that range meets an interval (exact), and marked full iff the
    range lies inside one interval (exact when the intervals are merged, see
    :func:`merge_intervals`). Work O(heads · M · QB) plus the tiles listed.
    """
    qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
    a = torch.as_tensor(a, dtype=torch.int64).reshape(heads, -1)
    b = torch.as_tensor(b, dtype=torch.int64).reshape(heads, -1)
    m_n = a.shape[1]
    qf_all, ql_all = block_bounds(nq, block_q, nk - nq)  # (QB,)
    # many intervals: process (head, query-tile chunk) pieces in key order, bounding temporaries
    step = qb_n if heads * m_n * qb_n <= _CHUNK else max(1, _CHUNK // m_n)
    keys, fulls = [], []
    for h in range(heads) if step < qb_n else [None]:
        hs = slice(None) if h is None else slice(h, h + 1)
        nh = heads if h is None else 1
        for t0 in range(0, qb_n, step):
            t1 = min(qb_n, t0 + step)
            A, B = a[hs, :, None], b[hs, :, None]           # (nh, M, 1)
            qf, ql = qf_all[t0:t1], ql_all[t0:t1]
            # keys k with a <= q - k <= b for some q of the tile: [qf - b, ql - a]
            k_lo = torch.clamp(qf - B, min=0)
            k_hi = torch.clamp(ql - A, max=nk - 1)
            lo = fdiv(k_lo, block_k)
            hi = torch.where((k_hi >= k_lo) & (A <= B), fdiv(k_hi, block_k) + 1, lo)
            # keys allowed for every q of the tile: [ql - b, qf - a]
            f_lo_pos = torch.clamp(ql - B, min=0)
            f_hi_pos = torch.clamp(qf - A, max=nk - 1)
            f_lo = cdiv_t(f_lo_pos, block_k)
            f_hi = torch.where(f_hi_pos == nk - 1, torch.full_like(f_hi_pos, kb_n), fdiv(f_hi_pos + 1, block_k))
            f_hi = torch.where(f_hi_pos >= f_lo_pos, f_hi, f_lo)
            shape = (nh * m_n, t1 - t0)
            coo = BlockCOO.from_ranges(nh * m_n, t1 - t0, kb_n, lo.reshape(shape), hi.reshape(shape),
                                       f_lo.reshape(shape), f_hi.reshape(shape))
            hm, t, u = coo.entries()
            head = hm // m_n if h is None else torch.full_like(hm, h)
            if m_n > 1:
                coo = BlockCOO.from_entries(heads, qb_n, kb_n, head, t + t0, u, coo.full)
                keys.append(coo.key)
                fulls.append(coo.full)
            else:
                keys.append((head * qb_n + t + t0) * kb_n + u)
                fulls.append(coo.full)
    return BlockCOO(heads, qb_n, kb_n, torch.cat(keys), torch.cat(fulls))


def coarsen_blocks(heads: int, nq: int, nk: int, block_q: int, block_k: int, block_size: int,
                   head: torch.Tensor, qblk: torch.Tensor, kblk: torch.Tensor) -> BlockCOO:
    """Tiles of a pattern that is constant on square *pattern blocks* of ``block_size``
    positions (block index = position // block_size, absolute positions).

    Args:
        head, qblk, kblk: int64 (E,) the allowed pattern-block pairs (duplicates are removed;
            pairs outside the problem are dropped).
    Returns:
        the tiles meeting an allowed pair (exact) with full = every pattern-block pair that
        meets the tile is allowed (exact: the tile then holds only allowed pairs).
    """
    qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
    bs = block_size
    off = nk - nq
    head, qblk, kblk = (x.to(torch.int64).reshape(-1) for x in (head, qblk, kblk))
    if head.numel() == 0:
        return BlockCOO.empty(heads, qb_n, kb_n)
    # unique pattern-level entries (over a bounded key space)
    p_min = fdiv(torch.tensor(off), bs)
    p_span = (nk - 1) // bs - int(p_min) + 1
    kb_span = (nk - 1) // bs + 1
    keep = (qblk >= p_min) & (qblk * bs <= nk - 1) & (kblk >= 0) & (kblk < kb_span)
    head, qblk, kblk = head[keep], qblk[keep], kblk[keep]
    uk = torch.unique((head * p_span + (qblk - p_min)) * kb_span + kblk)
    kblk = uk % kb_span
    qblk = (uk // kb_span) % p_span + p_min
    head = uk // kb_span // p_span
    # position ranges of each pattern block, clipped to the problem
    q0 = torch.clamp(qblk * bs, min=off)
    q1 = torch.clamp(qblk * bs + bs - 1, max=nk - 1)
    k0 = kblk * bs
    k1 = torch.clamp(k0 + bs - 1, max=nk - 1)
    tq0, tq1 = fdiv(q0 - off, block_q), fdiv(q1 - off, block_q)
    tk0, tk1 = fdiv(k0, block_k), fdiv(k1, block_k)
    n_tk = tk1 - tk0 + 1
    cnt = (tq1 - tq0 + 1) * n_tk
    e = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
    starts = torch.cumsum(cnt, 0) - cnt
    local = torch.arange(int(cnt.sum()), dtype=torch.int64) - starts[e]
    tq = tq0[e] + local // n_tk[e]
    tk = tk0[e] + local % n_tk[e]
    key = (head[e] * qb_n + tq) * kb_n + tk
    key, counts = torch.unique(key, return_counts=True)
    coo = BlockCOO(heads, qb_n, kb_n, key, torch.zeros_like(key, dtype=torch.bool))
    _, qf, ql, kf, kl = tile_bounds(coo, nq, nk, block_q, block_k)
    grid = (fdiv(ql, bs) - fdiv(qf, bs) + 1) * (fdiv(kl, bs) - fdiv(kf, bs) + 1)
    return BlockCOO(heads, qb_n, kb_n, key, counts == grid)


# ------------------------------------------------------------------ special positions
class Runs:
    """A sorted set of positions stored as maximal runs of consecutive integers, answering
    "first position >= a not in the set" and "last position <= b not in the set" per element."""

    def __init__(self, positions: tuple[int, ...]) -> None:
        p = sorted(set(positions))
        starts: list[int] = []
        ends: list[int] = []
        for x in p:
            if ends and x == ends[-1] + 1:
                ends[-1] = x
            else:
                starts.append(x)
                ends.append(x)
        self.starts = torch.tensor(starts, dtype=torch.int64)
        self.ends = torch.tensor(ends, dtype=torch.int64)

    def _run_at(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.starts.numel() == 0:
            z = torch.zeros_like(x)
            return torch.zeros_like(x, dtype=torch.bool), z
        idx = torch.searchsorted(self.starts, x, right=True) - 1
        ic = idx.clamp(min=0)
        inside = (idx >= 0) & (self.ends[ic] >= x)
        return inside, ic

    def first_free(self, a: torch.Tensor) -> torch.Tensor:
        inside, ic = self._run_at(a)
        return torch.where(inside, self.ends[ic] + 1, a) if self.starts.numel() else a

    def last_free(self, b: torch.Tensor) -> torch.Tensor:
        inside, ic = self._run_at(b)
        return torch.where(inside, self.starts[ic] - 1, b) if self.starts.numel() else b

    def any_in(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Whether [a, b] holds a position of the set."""
        if self.starts.numel() == 0:
            return torch.zeros_like(a, dtype=torch.bool)
        # the first run ending at or after a starts at or before b
        idx = torch.searchsorted(self.ends, a)
        ic = idx.clamp(max=self.starts.numel() - 1)
        return (idx < self.starts.numel()) & (self.starts[ic] <= b)


# ------------------------------------------------------------------------ sampling
_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    # a 32-bit integer finaliser (xor-shift-multiply), computed exactly in int64
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_ints(stream: int, row: torch.Tensor, slot: torch.Tensor, rnd: int | torch.Tensor,
                 n: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform integers in [0, n): a hash of (stream, row, slot, round).

    ``stream`` folds the seed and everything else the draw depends on into one int; the
    value for a (row, slot, round) never depends on which other rows are drawn. 63 hashed
    bits reduced modulo n (bias below n / 2**63)."""
    s = torch.tensor(stream & ((1 << 63) - 1), dtype=torch.int64)
    x = _mix(_mix(s & _M32) ^ (s >> 32))
    x = _mix(x ^ (row & _M32))
    x = _mix(x ^ ((row >> 32) & _M32))
    x = _mix(x ^ (slot & _M32))
    x = _mix(x ^ (torch.as_tensor(rnd, dtype=torch.int64) & _M32))
    hi = _mix(x ^ 0x68E31DA4)
    lo = _mix(x ^ 0x1B56C4E9)
    v = ((hi >> 1) << 32) | lo
    return torch.remainder(v, n)


def stream_of(*parts: int) -> int:
    """Fold ints (seed, sizes, a salt) into one 63-bit stream id."""
    h = 0x3C6EF372
    for p in parts:
        x = int(_mix(torch.tensor((p ^ h) & _M32, dtype=torch.int64)))
        x = int(_mix(torch.tensor(((p >> 32) ^ x) & _M32, dtype=torch.int64)))
        h = (h * 0x9E3779B1 + x) & ((1 << 63) - 1)
    return h


def _distinct_by_rejection(stream: int, row: torch.Tensor, n: torch.Tensor, c: torch.Tensor,
                           width: int) -> torch.Tensor:
    """(R, width) int64: per row, c[r] distinct values in [0, n[r]) (requires 2·c <= n, so a
    redraw collides with probability <= 1/2), sorted, then sentinels >= n[r] in the slots
    beyond c[r]. Uniform over c-subsets: colliding values are redrawn, which is symmetric in
    the values."""
    r_n = row.numel()
    slots = torch.arange(width, dtype=torch.int64)[None, :].expand(r_n, width)
    valid = slots < c[:, None]
    sentinel = n[:, None] + slots                            # unique, never collide with draws
    vals = torch.where(valid, uniform_ints(stream, row[:, None], slots, 0, n[:, None]), sentinel)
    for rnd in range(1, 256):
        vals, _ = torch.sort(vals, dim=1)
        dup = torch.zeros_like(vals, dtype=torch.bool)
        dup[:, 1:] = vals[:, 1:] == vals[:, :-1]
        if not bool(dup.any()):
            return vals
        ri, si = torch.nonzero(dup, as_tuple=True)
        vals[ri, si] = uniform_ints(stream, row[ri], si, rnd, n[ri])
    raise RuntimeError("sampling without replacement did not converge")  # probability < 2**-200


def sample_distinct(stream: int, row: torch.Tensor, n: torch.Tensor | int, m: int) -> torch.Tensor:
    """Per row r, min(m, n[r]) distinct integers drawn uniformly from [0, n[r]) without
    replacement; deterministic in (stream, row id), independent of the other rows drawn.

    Args:
        stream: the draw's stream (see :func:`stream_of`).
        row: int64 (R,) row ids (any ints, e.g. absolute query positions).
        n: int64 (R,) or int, population size per row (>= 0).
        m: how many to draw per row.
    Returns:
        int64 (R, m): each row ascending, padded with -1 after its min(m, n) values.
    """
    row = row.to(torch.int64).reshape(-1)
    r_n = row.numel()
    n = torch.as_tensor(n, dtype=torch.int64).expand(r_n).clone() if r_n else torch.zeros(0, dtype=torch.int64)
    out = torch.full((r_n, m), -1, dtype=torch.int64)
    if r_n == 0 or m == 0:
        return out
    slots = torch.arange(m, dtype=torch.int64)[None, :]
    small = n <= m
    if bool(small.any()):
        out[small] = torch.where(slots < n[small, None], slots, torch.full_like(slots, -1))
    big = n >= 2 * m
    if bool(big.any()):
        nb = n[big]
        out[big] = _distinct_by_rejection(stream, row[big], nb, torch.full_like(nb, m), m)
    mid = ~small & ~big                                      # m < n < 2m: draw the n - m left out
    if bool(mid.any()):
        nm = n[mid]
        excl_c = nm - m
        w = int(excl_c.max())
        excl = _distinct_by_rejection(stream ^ 0x5BD1E995, row[mid], nm, excl_c, w)
        width = int(nm.max())
        table = torch.arange(width, dtype=torch.int64)[None, :] < nm[:, None]
        ri = torch.arange(nm.numel())[:, None].expand_as(excl)
        ok = excl < nm[:, None]
        table[ri[ok], excl[ok]] = False
        kept = torch.nonzero(table, as_tuple=True)[1]       # row-major: ascending per row
        out[mid] = kept.reshape(nm.numel(), m)
    return out
