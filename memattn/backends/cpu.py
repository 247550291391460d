"""CPU backend: exact attention tiled with online softmax, O(N) memory.

Forward: for every query block, the key blocks its block map lists are visited in order
with the online-softmax recurrence (running max ``m``, running sum ``l``, float32
accumulator), so no (Nq, Nk) array ever exists. Backward (FlashAttention-2): for every key
block, the query blocks listing it are revisited; the probabilities are recomputed from the
saved log-sum-exp, dK/dV accumulate in a per-block buffer and dQ in an O(N) float32 buffer.
Only q, k, v, out and lse are saved for the backward.

Each tile step is one batched matrix product over (batch, kv head): the query tile is laid
out as (B'·Hkv', g·BQ, D) so each key/value head serves its g = Hq / Hkv query heads in one
product (GQA/MQA without copying K/V). Maxima and lse are taken on natural-log scores; the
probabilities are ``exp2((s - m)·log2 e)`` (``exp2`` is ~3x cheaper than ``exp`` here). The
element predicate of a pattern is evaluated only on the tiles its map marks partial.

Parallelism: the work (sub-problems of batch × kv heads, or ranges of query/key blocks when
there are fewer sub-problems than threads) is split over ``torch.get_num_threads()`` worker
threads, each running single-threaded tensor ops on its own scratch buffers. Thousands of
small multi-threaded ops would each end in a barrier between the intra-op threads, which
costs little on an idle machine but stalls for a whole time slice whenever another process
holds a core; independent workers do not wait for each other.

Tile sizes are chosen so that one score tile holds about ``_TILE_ELEMS`` elements
(benchmarks/NOTES.md, "CPU backend"); :func:`tile_sizes` overrides them (tests, tuning).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .._dropout import keep_mask
from ..patterns import BlockMap, Pattern

__all__ = ["attention", "attention_backward", "tile_sizes"]

_LOG2E = 1.0 / math.log(2.0)
# Running-max floor: finite, so that -inf scores minus it stay -inf (never NaN), and small
# enough that log2e times it does not overflow float32.
_FLOOR = -1e30
# Elements of one (B'·Hkv'·g·BQ, BK) score tile: 2**19 float32 = 2 MiB, about one L2 per core.
_TILE_ELEMS = 1 << 19
_MIN_BLOCK = 16
_MAX_BLOCK = 1024
_OVERRIDE: dict[str, tuple[int, int] | None] = {"blocks": None}


@contextlib.contextmanager
def tile_sizes(block_q: int, block_k: int) -> Iterator[None]:
    """Force the tile sizes of this backend inside a ``with`` block (testing and tuning).

    Args:
        block_q: query rows per tile (>= 1).
        block_k: keys per tile (>= 1).
    Example:
        >>> import torch, memattn
        >>> from memattn.backends import cpu
        >>> q = torch.randn(1, 2, 40, 8)
        >>> with cpu.tile_sizes(16, 8):
        ...     out = memattn.attention(q, q, q, causal=True, backend="cpu")
    """
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    old = _OVERRIDE["blocks"]
    _OVERRIDE["blocks"] = (block_q, block_k)
    try:
        yield
    finally:
        _OVERRIDE["blocks"] = old


def _pow2_floor(x: int) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, int(x - 1).bit_length())


def _pick_blocks(rows_per_q: int, nq: int, nk: int) -> tuple[int, int]:
    """Square power-of-two tiles of about _TILE_ELEMS score elements, clipped to the problem.

    ``rows_per_q`` is B'·Hkv'·g: how many score rows one query index contributes. A short
    query side (decoding) gives its unused budget to longer key blocks."""
    if _OVERRIDE["blocks"] is not None:
        return _OVERRIDE["blocks"]
    side = _pow2_floor(max(1, int(math.sqrt(_TILE_ELEMS / max(1, rows_per_q)))))
    side = min(_MAX_BLOCK, max(_MIN_BLOCK, side))
    bq = min(side, _pow2_ceil(nq))
    bk = side if bq == side else min(_MAX_BLOCK * 4, max(side, _pow2_floor(_TILE_ELEMS // (rows_per_q * bq))))
    return bq, min(bk, _pow2_ceil(nk))


def _chunks(B: int, Hkv: int, g: int, parts: int = 1) -> list[tuple[int, int, int, int]]:
    """Split (batch, kv head) into rectangles (b0, b1, h0, h1): at least ``parts`` of them when
    B·Hkv allows (one per worker), none wider than a 64x64 tile budget of _TILE_ELEMS."""
    cap = max(1, _TILE_ELEMS // (64 * 64))            # max B'·Hkv'·g per chunk
    hc = max(1, min(Hkv, cap // g, -(-Hkv // parts)))
    nh = -(-Hkv // hc)
    bc = max(1, min(B, cap // (hc * g), -(-B // -(-parts // nh))))
    return [(b0, min(B, b0 + bc), h0, min(Hkv, h0 + hc)) for b0 in range(0, B, bc) for h0 in range(0, Hkv, hc)]


def _poisoned() -> bool:
    return os.environ.get("MEMATTN_POISON", "") == "1"


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _poisoned():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class _Buffers:
    """Flat scratch buffers, grown on demand; ``get(name, shape)`` is a contiguous view."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        dt = dtype or self.dtype
        n = math.prod(shape)
        key = f"{name}:{dt}"
        buf = self.store.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dt)
            self.store[key] = buf
        return buf[:n].view(shape)


def _as_bmm(src: torch.Tensor, bufs: _Buffers, name: str) -> torch.Tensor:
    """A (B', H', n, d) slice as a (B'·H', n, d) batched matrix: a view when the layout
    allows it and the dtype is the compute dtype, otherwise a copy into a scratch buffer."""
    B_, H_, n, d = src.shape
    if (src.dtype == bufs.dtype and src.stride(3) == 1 and src.stride(2) >= d
            and (B_ == 1 or H_ == 1 or src.stride(0) == H_ * src.stride(1))):
        return src.reshape(B_ * H_, n, d)
    dst = bufs.get(name, (B_, H_, n, d))
    dst.copy_(src)
    return dst.view(B_ * H_, n, d)


def _q_tile(src: torch.Tensor, bufs: _Buffers, name: str) -> torch.Tensor:
    """A (B', Hkv', g, bq, d) query-side slice as the (B'·Hkv', g·bq, d) rows of one tile
    (a view when g == 1 and the layout allows, else a copy)."""
    B_, H_, g, n, d = src.shape
    if g == 1:
        return _as_bmm(src[:, :, 0], bufs, name)
    dst = bufs.get(name, (B_, H_, g, n, d))
    dst.copy_(src)
    return dst.view(B_ * H_, g * n, d)


@dataclass(frozen=True)
class _Params:
    pattern: Pattern | None
    scale: float
    softcap: float
    dropout_p: float
    dropout_seed: int
    num_q_heads: int


@dataclass(frozen=True)
class _Problem:
    """One sub-problem: a batch range and either a range of kv heads with all g query heads
    of each (shared block map) or a single query head (per-head block map).

    ``qside`` maps a (B, Hq, N, ...) tensor to its (B', Hkv', g', N, ...) view and ``kvside``
    a (B, Hkv, N, ...) tensor to (B', Hkv', N, ...), so every per-call tensor is sliced alike.
    """

    b0: int
    b1: int
    h0: int            # first kv head (grouped) or the query head (per-head)
    h1: int
    g: int             # query heads per kv head in the call
    per_head: bool

    @property
    def rows(self) -> int:
        """Score rows per query index: B'·Hkv'·g'."""
        return (self.b1 - self.b0) * (1 if self.per_head else (self.h1 - self.h0) * self.g)

    @property
    def map_head(self) -> int:
        return self.h0 if self.per_head else 0

    @property
    def heads(self) -> torch.Tensor:
        """int64 (Hkv', g'): absolute query head of each (kv head, group member)."""
        if self.per_head:
            return torch.tensor([[self.h0]], dtype=torch.int64)
        return torch.arange(self.h0 * self.g, self.h1 * self.g, dtype=torch.int64).view(self.h1 - self.h0, self.g)

    @property
    def batches(self) -> torch.Tensor:
        return torch.arange(self.b0, self.b1, dtype=torch.int64)

    def qside(self, t: torch.Tensor) -> torch.Tensor:
        if self.per_head:
            return t[self.b0:self.b1, self.h0:self.h0 + 1].unsqueeze(2)
        return t.unflatten(1, (-1, self.g))[self.b0:self.b1, self.h0:self.h1]

    def kvside(self, t: torch.Tensor) -> torch.Tensor:
        hk = self.h0 // self.g if self.per_head else self.h0
        hk1 = hk + 1 if self.per_head else self.h1
        return t[self.b0:self.b1, hk:hk1]


def _problems(B: int, Hq: int, Hkv: int, per_head: bool, parts: int) -> list[_Problem]:
    g = Hq // Hkv
    if per_head:
        per = -(-parts // Hq)
        return [_Problem(b0, b1, h, h + 1, g, True) for h in range(Hq) for b0, b1, _, _ in _chunks(B, 1, 1, per)]
    return [_Problem(b0, b1, h0, h1, g, False) for b0, b1, h0, h1 in _chunks(B, Hkv, g, parts)]


def _is_per_head(pattern: Pattern | None) -> bool:
    return pattern is not None and (pattern.num_heads or 1) > 1


class _Rows:
    """Tile lists of one block-map head: ``rows[r]`` = [(column block, full), ...]."""

    def __init__(self, bmap: BlockMap | None, head: int, n_rows: int, n_cols: int) -> None:
        if bmap is None:
            every = [(c, True) for c in range(n_cols)]
            self.rows = [every] * n_rows
            return
        ptr = bmap.row_ptr[head * n_rows:(head + 1) * n_rows + 1].tolist()
        col = bmap.col[ptr[0]:ptr[-1]].tolist()
        full = bmap.full[ptr[0]:ptr[-1]].tolist()
        o = ptr[0]
        self.rows = [list(zip(col[a - o:b - o], full[a - o:b - o])) for a, b in zip(ptr[:-1], ptr[1:])]

    def __getitem__(self, r: int) -> list[tuple[int, bool]]:
        return self.rows[r]


def _tile_mask(prm: _Params, pb: _Problem, nq: int, nk: int, q0: int, bq: int, k0: int, bk: int) -> torch.Tensor:
    """bool, broadcastable to (B', Hkv', g', bq, bk): the pattern's predicate on one tile.

    The predicate is called as the reference calls it: b (B', 1, 1, 1), h (1, H', 1, 1) and
    absolute positions q_pos (1, 1, bq, 1), kv_pos (1, 1, 1, bk)."""
    assert prm.pattern is not None
    heads = pb.heads
    Hk, g = heads.shape
    qp = torch.arange(q0, q0 + bq, dtype=torch.int64).view(1, 1, bq, 1) + (nk - nq)
    kp = torch.arange(k0, k0 + bk, dtype=torch.int64).view(1, 1, 1, bk)
    m = torch.as_tensor(prm.pattern.mask(pb.batches.view(-1, 1, 1, 1), heads.reshape(1, Hk * g, 1, 1), qp, kp),
                        dtype=torch.bool)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    mb, mh = m.shape[0], m.shape[1]
    m = torch.broadcast_to(m, (mb, mh, bq, bk))
    if mh > 1:
        return m.reshape(mb, Hk, g, bq, bk)
    return m.reshape(mb, 1, 1, bq, bk)


def _tile_bias(prm: _Params, pb: _Problem, nq: int, nk: int, q0: int, bq: int, k0: int, bk: int,
               dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, -inf elsewhere, broadcastable to (B', Hkv', g', bq, bk): adding it to
    the scores is several times cheaper than a broadcast masked_fill_ on this CPU."""
    m = _tile_mask(prm, pb, nq, nk, q0, bq, k0, bk)
    return torch.where(m, torch.zeros((), dtype=dtype), torch.full((), -math.inf, dtype=dtype))


def _keep_factor(prm: _Params, pb: _Problem, q0: int, bq: int, k0: int, bk: int, dtype: torch.dtype) -> torch.Tensor:
    """(B'·Hkv', g'·bq, bk): keep / (1 - p) for one tile, from the shared counter hash
    (bh = b·Hq + h, query and key *indices*)."""
    heads = pb.heads
    Hk, g = heads.shape
    Bp = pb.b1 - pb.b0
    bh = pb.batches.view(-1, 1, 1, 1, 1) * prm.num_q_heads + heads.view(1, Hk, g, 1, 1)
    qi = torch.arange(q0, q0 + bq, dtype=torch.int64).view(bq, 1)
    ki = torch.arange(k0, k0 + bk, dtype=torch.int64).view(1, bk)
    keep = keep_mask(prm.dropout_seed, bh, qi, ki, prm.dropout_p)
    return (keep.to(dtype) * (1.0 / (1.0 - prm.dropout_p))).reshape(Bp * Hk, g * bq, bk)


def _scores(s: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, prm: _Params,
            neg_bias: torch.Tensor | None = None, tanh_out: torch.Tensor | None = None) -> torch.Tensor:
    """s ← natural-log scores (softcapped when asked) plus ``neg_bias`` (BH, R, 1) when given.

    (BH, R, D) @ (BH, D, bk) -> (BH, R, bk). The bias (-lse in the backward) is added before
    any change of log base, so exponents near 0 (the probabilities that matter) carry no
    rounding from the size of the scores. With softcap, ``tanh_out`` receives
    tanh(raw / softcap) for the backward's derivative."""
    kT = kt.transpose(1, 2)
    if prm.softcap > 0:
        torch.baddbmm(s, qt, kT, beta=0.0, alpha=prm.scale / prm.softcap, out=s)
        s.tanh_()
        if tanh_out is not None:
            tanh_out.copy_(s)
        if neg_bias is not None:
            return torch.add(neg_bias, s, alpha=prm.softcap, out=s)
        return s.mul_(prm.softcap)
    if neg_bias is None:
        return torch.baddbmm(s, qt, kT, beta=0.0, alpha=prm.scale, out=s)
    return torch.baddbmm(neg_bias, qt, kT, beta=1.0, alpha=prm.scale, out=s)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _setup(q: torch.Tensor, k: torch.Tensor, prm: _Params,
           workers: int) -> tuple[int, int, BlockMap | None, list[_Problem]]:
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    problems = _problems(B, Hq, Hkv, _is_per_head(prm.pattern), workers)
    BQ, BK = _pick_blocks(problems[0].rows, Nq, Nk)
    bmap = prm.pattern.block_map(Nq, Nk, BQ, BK) if prm.pattern is not None else None
    return BQ, BK, bmap, problems


# ------------------------------------------------------------------------- parallelism
_POOL: dict[str, object] = {"pool": None, "size": 0, "pid": 0}
_POOL_LOCK = threading.Lock()


_FWD_ROW_SPLIT = True
# Below this many (query, key) score elements in a call, threads cost more than they save.
_INLINE_ELEMS = 1 << 21


def _workers(q: torch.Tensor, k: torch.Tensor) -> int:
    """Worker threads for one call: the caller's intra-op thread count (1 for small calls)."""
    if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _INLINE_ELEMS:
        return 1
    return max(1, torch.get_num_threads())


def _pool(size: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL["pool"] is None or _POOL["size"] != size or _POOL["pid"] != os.getpid():
            old = _POOL["pool"]
            if old is not None and _POOL["pid"] == os.getpid():
                old.shutdown(wait=False)  # type: ignore[attr-defined]
            # a forked child inherits no threads: a pool from the parent pid is replaced, not used
            _POOL.update(pool=ThreadPoolExecutor(size, thread_name_prefix="memattn-cpu"), size=size,
                         pid=os.getpid())
        return _POOL["pool"]  # type: ignore[return-value]


Task = Callable[["_Buffers"], None]


def _run(units: list[list[Task]], cdt: torch.dtype) -> None:
    """Run each unit (a list of tasks sharing one scratch-buffer set) on its own worker.

    One unit runs inline. Several run on pool threads with single-threaded tensor ops
    (``torch.set_num_threads(1)`` is per thread for the OpenMP/MKL pools; the global default
    is restored when the unit ends), autograd off and the caller's inference mode (both are
    thread-local)."""
    units = [u for u in units if u]
    if len(units) <= 1:
        bufs = _Buffers(cdt)
        for task in (units[0] if units else []):
            task(bufs)
        return

    inference = torch.is_inference_mode_enabled()  # thread-local too: outputs may be inference tensors
    # The caller's thread count, read once here: with some OpenMP runtimes a worker's
    # set_num_threads reaches the process default, so a worker that read "prev" while another
    # had set 1 would restore 1 and leave the whole process single-threaded.
    caller_threads = torch.get_num_threads()

    def unit_main(tasks: list[Task]) -> None:
        torch.set_num_threads(1)
        try:
            with torch.inference_mode(inference), torch.no_grad():
                bufs = _Buffers(cdt)
                for task in tasks:
                    task(bufs)
        finally:
            torch.set_num_threads(caller_threads)

    futures = [_pool(len(units)).submit(unit_main, u) for u in units]
    for f in futures:
        f.result()


def _assign(items: list[tuple[float, Task]], workers: int) -> list[list[Task]]:
    """Longest-processing-time-first assignment of (cost, task) items to workers."""
    loads = [0.0] * workers
    units: list[list[Task]] = [[] for _ in range(workers)]
    for cost, task in sorted(items, key=lambda it: -it[0]):
        w = min(range(workers), key=loads.__getitem__)
        loads[w] += cost
        units[w].append(task)
    return units


def _split_ranges(costs: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges of indices with about equal total cost (at most ``parts``)."""
    total = sum(costs)
    if parts <= 1 or total == 0 or len(costs) <= 1:
        return [(0, len(costs))]
    ranges, start, acc = [], 0, 0
    for i, c in enumerate(costs):
        acc += c
        if acc >= total * (len(ranges) + 1) / parts and len(ranges) < parts - 1 and i + 1 < len(costs):
            ranges.append((start, i + 1))
            start = i + 1
    ranges.append((start, len(costs)))
    return ranges


# --------------------------------------------------------------------------- forward
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prm: _Params) -> tuple[torch.Tensor, torch.Tensor]:
    """out in q's dtype and lse in the compute dtype (float64 for float64, else float32)."""
    B, Hq, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    cdt = _compute_dtype(q.dtype)
    out = _new_output((B, Hq, Nq, Dv), q.dtype, q.device)
    lse = _new_output((B, Hq, Nq), cdt, q.device)
    workers = _workers(q, k)
    # A shared map with partial tiles: split query blocks, not heads, over the workers, so that
    # each partial tile's predicate is evaluated once rather than once per worker.
    by_rows = _FWD_ROW_SPLIT and prm.pattern is not None and not _is_per_head(prm.pattern)
    BQ, BK, bmap, problems = _setup(q, k, prm, 1 if by_rows else workers)
    QB, KB = -(-Nq // BQ), -(-Nk // BK)
    rows: dict[int, _Rows] = {}
    # fewer sub-problems than workers: also split each one's query blocks (rows are independent)
    parts = 1 if len(problems) >= workers else -(-workers // len(problems))
    items: list[tuple[float, Task]] = []
    for pb in problems:
        if pb.map_head not in rows:
            rows[pb.map_head] = _Rows(bmap, pb.map_head, QB, KB)
        r = rows[pb.map_head]
        costs = [len(r[i]) for i in range(QB)]
        for r0, r1 in _split_ranges(costs, parts):
            def task(bufs: _Buffers, pb=pb, r=r, r0=r0, r1=r1) -> None:
                _forward_problem(pb, prm, r, BQ, BK, q, k, v, out, lse, bufs, r0, r1)
            items.append((pb.rows * (sum(costs[r0:r1]) + 1), task))
    _run(_assign(items, workers), cdt)
    return out, lse


def _forward_problem(pb: _Problem, prm: _Params, rows: _Rows, BQ: int, BK: int, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, bufs: _Buffers, r0: int, r1: int) -> None:
    """Query blocks r0 <= i < r1 of one sub-problem: online softmax over each one's tiles."""
    qv, kv, vv, ov, lv = pb.qside(q), pb.kvside(k), pb.kvside(v), pb.qside(out), pb.qside(lse)
    Bp, Hk, g, Nq, D = qv.shape
    Nk, Dv = kv.shape[2], vv.shape[3]
    BH = Bp * Hk
    cdt = bufs.dtype
    for i in range(r0, r1):
        q0 = i * BQ
        bq = min(BQ, Nq - q0)
        R = g * bq
        qt = _q_tile(qv[:, :, :, q0:q0 + bq], bufs, "q")
        m = torch.full((BH, R), -math.inf, dtype=cdt)
        l = torch.zeros((BH, R), dtype=torch.float64)  # running row sums in float64 (lse to the last ulp)
        acc = bufs.get("acc", (BH, R, Dv)).zero_()
        for kb, full in rows[i]:
            k0 = kb * BK
            bk = min(BK, Nk - k0)
            kt = _as_bmm(kv[:, :, k0:k0 + bk], bufs, "k")
            vt = _as_bmm(vv[:, :, k0:k0 + bk], bufs, "v")
            s = _scores(bufs.get("s", (BH, R, bk)), qt, kt, prm)
            if not full:
                s.view(Bp, Hk, g, bq, bk).add_(_tile_bias(prm, pb, Nq, Nk, q0, bq, k0, bk, cdt))
            m_new = torch.amax(s, dim=-1)
            torch.maximum(m_new, m, out=m_new)
            m_new.clamp_(min=_FLOOR)  # a row with nothing allowed yet: exp(-inf - floor) = 0, not NaN
            alpha = (m.to(torch.float64) - m_new).exp_()       # rescale of the earlier tiles, float64
            # p = exp2((s − m)·log2e): exp2 is ~3x cheaper than exp here; scaling after the
            # subtraction keeps the exponent's rounding proportional to |s − m|, not |s|
            s.sub_(m_new.unsqueeze(-1)).mul_(_LOG2E).exp2_()
            l.mul_(alpha).add_(s.sum(dim=-1))                 # tile sum in cdt, running sum in float64
            acc.mul_(alpha.to(cdt).unsqueeze(-1))
            if prm.dropout_p > 0:
                s.mul_(_keep_factor(prm, pb, q0, bq, k0, bk, cdt))
            acc.baddbmm_(s, vt)
            m = m_new
        # out = acc / l (0 where the row allowed nothing), lse = m + ln l (-inf there), the
        # sum in float64 so that lse carries no rounding beyond m's and l's
        acc.div_(torch.where(l > 0, l, torch.ones_like(l)).to(cdt).unsqueeze(-1))
        ov[:, :, :, q0:q0 + bq].copy_(acc.view(Bp, Hk, g, bq, Dv))
        lse_t = m.to(torch.float64).add_(l.log())
        lv[:, :, :, q0:q0 + bq].copy_(lse_t.view(Bp, Hk, g, bq))


# -------------------------------------------------------------------------- backward
def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
              lse: torch.Tensor, prm: _Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward: dK/dV per key block over the query blocks that list it,
    dQ accumulated in an O(N) float32 (float64) buffer."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    g = Hq // Hkv
    cdt = _compute_dtype(q.dtype)
    workers = _workers(q, k)
    BQ, BK, bmap, problems = _setup(q, k, prm, workers)
    QB, KB = -(-Nq // BQ), -(-Nk // BK)
    tmap = bmap.transposed() if bmap is not None else None
    # a row with nothing allowed (lse = -inf) gets +inf so that p = exp(s - lse) = 0
    lse_c = lse.to(cdt)
    lse_c = lse_c.masked_fill(torch.isneginf(lse_c), math.inf)
    # delta_i = dout_i · out_i, by query block so no (N, D) temporary in the compute dtype
    delta = torch.empty((B, Hq, Nq), dtype=cdt)
    for q0 in range(0, Nq, BQ):
        sl = slice(q0, q0 + BQ)
        delta[:, :, sl] = (dout[:, :, sl].to(cdt) * out[:, :, sl].to(cdt)).sum(-1)
    # per-head maps with GQA: the g query heads of a kv head are separate sub-problems → sum
    accumulate_kv = _is_per_head(prm.pattern) and g > 1
    # fewer sub-problems than workers: split key blocks too; dQ then needs a buffer per worker
    parts = 1 if len(problems) >= workers else -(-workers // len(problems))
    n_dq = workers if parts > 1 else 1
    n_kv = workers if accumulate_kv else 1
    dq_acc = [torch.zeros((B, Hq, Nq, D), dtype=cdt) for _ in range(n_dq)]
    if accumulate_kv:
        dk_out = [torch.zeros((B, Hkv, Nk, D), dtype=cdt) for _ in range(n_kv)]
        dv_out = [torch.zeros((B, Hkv, Nk, Dv), dtype=cdt) for _ in range(n_kv)]
    else:
        dk_out = [_new_output((B, Hkv, Nk, D), k.dtype, k.device)]
        dv_out = [_new_output((B, Hkv, Nk, Dv), v.dtype, v.device)]
    cols: dict[int, _Rows] = {}
    items: list[tuple[float, list]] = []
    for pb in problems:
        if pb.map_head not in cols:
            cols[pb.map_head] = _Rows(tmap, pb.map_head, KB, QB)
        c = cols[pb.map_head]
        costs = [len(c[j]) for j in range(KB)]
        for c0, c1 in _split_ranges(costs, parts):
            items.append((pb.rows * (sum(costs[c0:c1]) + 1), [pb, c, c0, c1]))
    # assign first, then bind each unit to its worker's private accumulators (if any)
    slots = _assign([(cost, i) for i, (cost, _) in enumerate(items)], workers)  # type: ignore[misc]
    units: list[list[Task]] = []
    for w, idxs in enumerate(slots):
        unit = []
        for i in idxs:
            pb, c, c0, c1 = items[i][1]  # type: ignore[misc]

            def task(bufs: _Buffers, pb=pb, c=c, c0=c0, c1=c1, w=w) -> None:
                _backward_problem(pb, prm, c, BQ, BK, q, k, v, dout, lse_c, delta, dq_acc[w % n_dq],
                                  dk_out[w % n_kv], dv_out[w % n_kv], accumulate_kv, bufs, c0, c1)
            unit.append(task)
        units.append(unit)
    _run(units, cdt)
    dq = dq_acc[0]
    for extra in dq_acc[1:]:
        dq.add_(extra)
    dk, dv = dk_out[0], dv_out[0]
    for ek, ev in zip(dk_out[1:], dv_out[1:]):
        dk.add_(ek)
        dv.add_(ev)
    dq = dq if q.dtype == cdt else dq.to(q.dtype)
    dk = dk if dk.dtype == k.dtype else dk.to(k.dtype)
    dv = dv if dv.dtype == v.dtype else dv.to(v.dtype)
    return dq, dk, dv


def _backward_problem(pb: _Problem, prm: _Params, cols: _Rows, BQ: int, BK: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                      dq_acc: torch.Tensor, dk_out: torch.Tensor, dv_out: torch.Tensor, accumulate_kv: bool,
                      bufs: _Buffers, c0: int, c1: int) -> None:
    """Key blocks c0 <= j < c1 of one sub-problem: dK/dV of each over the query blocks listing it."""
    qv, kv, vv, dov = pb.qside(q), pb.kvside(k), pb.kvside(v), pb.qside(dout)
    lv, dlv, dqv = pb.qside(lse), pb.qside(delta), pb.qside(dq_acc)
    dkv, dvv = pb.kvside(dk_out), pb.kvside(dv_out)
    Bp, Hk, g, Nq, D = qv.shape
    Nk, Dv = kv.shape[2], vv.shape[3]
    BH = Bp * Hk
    cdt = bufs.dtype
    for j in range(c0, c1):
        k0 = j * BK
        bk = min(BK, Nk - k0)
        kt = _as_bmm(kv[:, :, k0:k0 + bk], bufs, "k")
        vt = _as_bmm(vv[:, :, k0:k0 + bk], bufs, "v")
        dk_blk = bufs.get("dk", (BH, bk, D)).zero_()
        dv_blk = bufs.get("dv", (BH, bk, Dv)).zero_()
        for i, full in cols[j]:
            q0 = i * BQ
            bq = min(BQ, Nq - q0)
            R = g * bq
            qt = _q_tile(qv[:, :, :, q0:q0 + bq], bufs, "q")
            dot = _q_tile(dov[:, :, :, q0:q0 + bq], bufs, "do")
            nl = bufs.get("nl", (Bp, Hk, g, bq))
            torch.neg(lv[:, :, :, q0:q0 + bq], out=nl)
            nd = bufs.get("nd", (Bp, Hk, g, bq))
            torch.neg(dlv[:, :, :, q0:q0 + bq], out=nd)
            tanh_t = bufs.get("t", (BH, R, bk)) if prm.softcap > 0 else None
            # s - lse: (BH, R, D) @ (BH, D, bk)
            p = _scores(bufs.get("s", (BH, R, bk)), qt, kt, prm, neg_bias=nl.view(BH, R, 1), tanh_out=tanh_t)
            if not full:
                p.view(Bp, Hk, g, bq, bk).add_(_tile_bias(prm, pb, Nq, Nk, q0, bq, k0, bk, cdt))
            p.mul_(_LOG2E).exp2_()                                       # P = exp(s − lse)
            if prm.dropout_p > 0:
                z = _keep_factor(prm, pb, q0, bq, k0, bk, cdt)
                dv_blk.baddbmm_((p * z).transpose(1, 2), dot)            # (BH, bk, R) @ (BH, R, Dv)
                dp = torch.bmm(dot, vt.transpose(1, 2), out=bufs.get("dp", (BH, R, bk)))
                dp.mul_(z).add_(nd.view(BH, R, 1))
            else:
                dv_blk.baddbmm_(p.transpose(1, 2), dot)                  # (BH, bk, R) @ (BH, R, Dv)
                # dp - delta: (BH, R, Dv) @ (BH, Dv, bk)
                dp = torch.baddbmm(nd.view(BH, R, 1), dot, vt.transpose(1, 2), out=bufs.get("dp", (BH, R, bk)))
            ds = dp.mul_(p)                                              # dS = P ∘ (dP − delta)
            if tanh_t is not None:
                ds.mul_(tanh_t.mul_(tanh_t).neg_().add_(1.0))            # d softcap·tanh(x/softcap) = 1 − tanh²
            dq_t = torch.bmm(ds, kt, out=bufs.get("dq", (BH, R, D)))     # (BH, R, bk) @ (BH, bk, D)
            dqv[:, :, :, q0:q0 + bq].add_(dq_t.view(Bp, Hk, g, bq, D), alpha=prm.scale)
            dk_blk.baddbmm_(ds.transpose(1, 2), qt, alpha=prm.scale)    # (BH, bk, R) @ (BH, R, D)
        dkb, dvb = dk_blk.view(Bp, Hk, bk, D), dv_blk.view(Bp, Hk, bk, Dv)
        if accumulate_kv:
            dkv[:, :, k0:k0 + bk].add_(dkb)
            dvv[:, :, k0:k0 + bk].add_(dvb)
        else:
            dkv[:, :, k0:k0 + bk].copy_(dkb)
            dvv[:, :, k0:k0 + bk].copy_(dvb)


# ---------------------------------------------------------------------------- autograd
class _CpuAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse only; the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, prm):  # type: ignore[override]
        out, lse_c = _forward(q, k, v, prm)
        ctx.save_for_backward(q, k, v, out, lse_c)
        ctx.prm = prm
        lse = lse_c if lse_c.dtype == torch.float32 else lse_c.to(torch.float32)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse_c = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, dout, lse_c, ctx.prm)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None, scale: float,
              softcap: float = 0.0, dropout_p: float = 0.0,
              dropout_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled exact attention on validated inputs (called by :func:`memattn.attention`).

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); any strides, Hq % Hkv == 0,
            float16/bfloat16/float32/float64 on the CPU.
        pattern: a Pattern (causal already merged in) or None for all pairs.
        scale: score scale (> 0). softcap: > 0 applies softcap·tanh(s / softcap).
        dropout_p: dropout probability; dropout_seed: seed of the shared counter hash.
    Returns:
        out (B, Hq, Nq, Dv) in q's dtype and lse float32 (B, Hq, Nq) (natural log, -inf for
        a row with no allowed key, whose output is 0). Differentiable in q, k and v.

    Example:
        >>> import torch
        >>> from memattn.backends import cpu
        >>> q = torch.randn(1, 4, 100, 32, requires_grad=True)
        >>> kv = torch.randn(1, 2, 100, 32)
        >>> out, lse = cpu.attention(q, kv, kv, pattern=None, scale=32 ** -0.5)
        >>> out.sum().backward()
    """
    if q.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got q on {q.device}")
    if pattern is not None:  # bind size-dependent patterns (random, bigbird); idempotent
        pattern = pattern.for_sizes(q.shape[2], k.shape[2])
    prm = _Params(pattern, float(scale), float(softcap), float(dropout_p), int(dropout_seed), q.shape[1])
    return _CpuAttention.apply(q, k, v, prm)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                       lse: torch.Tensor, *, pattern: Pattern | None, scale: float,
                       softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward from the final out and lse (no dropout).

    Args:
        q, k, v: as in :func:`attention`; out, dout: (B, Hq, Nq, Dv); lse: (B, Hq, Nq) natural log.
        pattern, scale, softcap: as in :func:`attention`.
    Returns:
        dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv) in the inputs' dtype.

    Example:
        >>> import torch
        >>> from memattn.backends import cpu
        >>> q = torch.randn(1, 2, 50, 16)
        >>> out, lse = cpu.attention(q, q, q, pattern=None, scale=0.25)
        >>> dq, dk, dv = cpu.attention_backward(q, q, q, out, torch.ones_like(out), lse, pattern=None, scale=0.25)
    """
    if q.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got q on {q.device}")
    if pattern is not None:
        pattern = pattern.for_sizes(q.shape[2], k.shape[2])
    prm = _Params(pattern, float(scale), float(softcap), 0.0, 0, q.shape[1])
    with torch.no_grad():
        return _backward(q.detach(), k.detach(), v.detach(), out.detach(), dout.detach(), lse.detach(), prm)
