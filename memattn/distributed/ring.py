"""Ring attention: the sequence is sharded over W ranks; key/value blocks travel round a ring.

Each rank keeps its query shard and, for W steps, computes attention against the key/value
block it holds, then passes that block to the next rank (rank r sends to r+1 and receives
from r−1, so at step t it holds the keys of rank r−t). Partial results merge exactly through
their log-sum-exp. The next block's send/receive is posted before the current block is
computed, so communication hides behind compute (double buffering).

Which (query chunk, key chunk) pairs are computed is decided once per configuration by a
:class:`RingPlan`: pairs a causal mask or a window puts out of reach are skipped, and when
no rank needs keys more than s ranks away the ring stops after s+1 steps.

The backward rotates k, v again; each step adds that block's dq, dk, dv, from the final out
and lse, into the accumulators (:func:`memattn.api.attention_backward` with
``accumulate_into``: the kernels, Triton and on sm_90 Gluon, add in place, so no step
allocates gradients of its own), keeps dq, and passes the dk/dv accumulators along with the
block so that they end at the rank owning those keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..api import BACKENDS, attention, attention_backward, validate_inputs
from ..patterns import Pattern
from ..patterns import causal as _causal_pattern
from ._patterns import shift
from .sharding import (LAYOUTS, GroupInfo, _comm_device, check_consistent, dtype_code, float_bits, group_info,
                       layout_chunks, text_hash)

__all__ = ["ring_attention", "RingPlan", "RingTask", "RingStats", "plan_ring", "last_ring_stats"]


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class RingTask:
    """One local attention call: this rank's queries [q0, q1) × the visiting block's keys [k0, k1).

    ``causal`` and ``pattern`` are what the local call uses (positions already shifted);
    ``chunk_pairs`` is how many (query chunk, key chunk) pairs the call covers.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool = False
    pattern: Pattern | None = None
    chunk_pairs: int = 1


@dataclass(frozen=True)
class RingPlan:
    """What every rank computes at every ring step (identical on all ranks).

    ``tasks[rank][t]`` are the calls rank makes at step t, with the keys of rank
    ``(rank − t) mod world``; ``steps`` (1..world) is how many key blocks visit each rank.
    """

    world: int
    layout: str
    n_local: int
    chunk: int
    steps: int
    tasks: tuple[tuple[tuple[RingTask, ...], ...], ...]
    chunk_pairs_total: int  # (query chunk, key chunk) pairs per rank, computed or not

    def source(self, rank: int, step: int) -> int:
        """The rank whose keys ``rank`` holds at ``step``."""
        return (rank - step) % self.world

    def sources(self, rank: int) -> tuple[int, ...]:
        """Ranks whose keys ``rank`` computes with."""
        return tuple(self.source(rank, t) for t, ts in enumerate(self.tasks[rank]) if ts)

    def calls(self, rank: int) -> int:
        """Local attention calls ``rank`` makes in one forward."""
        return sum(len(ts) for ts in self.tasks[rank])

    def chunk_pairs_computed(self, rank: int) -> int:
        return sum(t.chunk_pairs for ts in self.tasks[rank] for t in ts)


def _fine_block(c: int) -> int:
    """A divisor of the chunk length to read a pattern's block map at (<= 128 where possible)."""
    if c <= 128:
        return c
    for g in range(128, 15, -1):
        if c % g == 0:
            return g
    return c


def _chunk_visibility(pe: Pattern | None, causal_only: bool, n_chunks: int,
                      c: int) -> tuple[list[list[bool]], list[list[bool]]]:
    """visible[qc][kc]: some pair allowed; full[qc][kc]: every pair allowed (all heads)."""
    rng = range(n_chunks)
    if pe is None:
        return [[True] * n_chunks for _ in rng], [[True] * n_chunks for _ in rng]
    if causal_only:
        return [[kc <= qc for kc in rng] for qc in rng], [[kc < qc for kc in rng] for qc in rng]
    g = _fine_block(c)
    per = c // g
    n = n_chunks * c
    bm = pe.block_map(n, n, g, g)
    qb_n = bm.num_q_blocks
    rows = torch.repeat_interleave(torch.arange(bm.num_heads * qb_n), bm.row_ptr[1:] - bm.row_ptr[:-1])
    key = ((rows % qb_n) // per) * n_chunks + bm.col.to(torch.int64) // per
    listed = torch.bincount(key, minlength=n_chunks * n_chunks).view(n_chunks, n_chunks)
    fulls = torch.bincount(key[bm.full], minlength=n_chunks * n_chunks).view(n_chunks, n_chunks)
    return (listed > 0).tolist(), (fulls == per * per * bm.num_heads).tolist()


def _pair_tasks(r: int, s: int, qcs: tuple[int, ...], kcs: tuple[int, ...], c: int, visible, full,
                pe: Pattern | None, pattern: Pattern | None, causal: bool) -> tuple[RingTask, ...]:
    pairs = [(a, b) for a, qc in enumerate(qcs) for b, kc in enumerate(kcs) if visible[qc][kc]]
    if not pairs:
        return ()
    qa = sorted({a for a, _ in pairs})
    kb = sorted({b for _, b in pairs})
    rectangle = (len(pairs) == len(qa) * len(kb) and qa == list(range(qa[0], qa[-1] + 1))
                 and kb == list(range(kb[0], kb[-1] + 1)))
    if rectangle and all(full[qcs[a]][kcs[b]] for a, b in pairs):
        return (RingTask(qa[0] * c, (qa[-1] + 1) * c, kb[0] * c, (kb[-1] + 1) * c, chunk_pairs=len(pairs)),)
    if r == s and pattern is None and causal:
        # Local order is global order within a shard, so plain causal is exact here.
        n = len(qcs) * c
        return (RingTask(0, n, 0, n, causal=True, chunk_pairs=len(pairs)),)
    tasks = []
    for a, b in pairs:
        qc, kc = qcs[a], kcs[b]
        sl = (a * c, (a + 1) * c, b * c, (b + 1) * c)
        if full[qc][kc]:
            tasks.append(RingTask(*sl))
        elif pattern is None and causal and qc == kc:
            tasks.append(RingTask(*sl, causal=True))
        else:
            tasks.append(RingTask(*sl, pattern=shift(pe, qc * c, kc * c)))  # type: ignore[arg-type]
    return tuple(tasks)


def plan_ring(world: int, layout: str, n_local: int, *, causal: bool = False,
              pattern: Pattern | None = None) -> RingPlan:
    """Decide every rank's calls at every step (pure, cheap, cached).

    Args:
        world: ranks in the ring.
        layout: "zigzag" or "contiguous".
        n_local: shard length per rank (even for zigzag).
        causal, pattern: as in :func:`memattn.attention`, on global positions.
    Returns:
        a :class:`RingPlan`.

    Example:
        >>> p = plan_ring(2, "zigzag", 8, causal=True)
        >>> p.steps, [(t.q0, t.q1, t.k0, t.k1, t.causal) for t in p.tasks[0][1]]
        (2, [(4, 8, 0, 8, False)])
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    per = len(layout_chunks(layout, 0, world))
    if not isinstance(n_local, int) or n_local < per or n_local % per:
        raise ValueError(f"n_local must be a positive multiple of {per} for layout {layout!r}, got {n_local!r}")
    try:
        hash(pattern)
    except TypeError:
        return _plan_ring(world, layout, n_local, causal, pattern)
    return _plan_ring_cached(world, layout, n_local, causal, pattern)


def _plan_ring(world: int, layout: str, n_local: int, causal: bool, pattern: Pattern | None) -> RingPlan:
    chunks = [layout_chunks(layout, r, world) for r in range(world)]
    per = len(chunks[0])
    c = n_local // per
    n_chunks = world * per
    if pattern is None:
        pe = _causal_pattern() if causal else None
    else:
        pe = pattern & _causal_pattern() if causal else pattern
    visible, full = _chunk_visibility(pe, causal and pattern is None, n_chunks, c)
    table = [[() for _ in range(world)] for _ in range(world)]
    for r in range(world):
        for s in range(world):
            table[r][(r - s) % world] = _pair_tasks(r, s, chunks[r], chunks[s], c, visible, full, pe, pattern, causal)
    steps = 1 + max((t for r in range(world) for t in range(1, world) if table[r][t]), default=0)
    tasks = tuple(tuple(row[:steps]) for row in table)
    return RingPlan(world, layout, n_local, c, steps, tasks, per * per * world)


_plan_ring_cached = functools.lru_cache(maxsize=64)(_plan_ring)


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class RingStats:
    """What the last :func:`ring_attention` forward did on this rank.

    ``steps``: key blocks that visited (1 = no communication); ``sources``: ranks whose
    keys were used; ``attention_calls``: local kernel calls; ``chunk_pairs_computed`` out
    of ``chunk_pairs_total`` (query chunk, key chunk) pairs; the rest were skipped.
    """

    world: int
    rank: int
    layout: str
    steps: int
    sources: tuple[int, ...]
    attention_calls: int
    chunk_pairs_computed: int
    chunk_pairs_total: int

    @property
    def chunk_pairs_skipped(self) -> int:
        return self.chunk_pairs_total - self.chunk_pairs_computed


_LAST_STATS: list[RingStats] = []


def last_ring_stats() -> RingStats | None:
    """Statistics of the latest :func:`ring_attention` call in this process (None before any).

    Example:
        >>> # out = ring_attention(q, k, v, causal=True, pattern=patterns.sliding_window(64))
        >>> # last_ring_stats().steps   # 2: keys more than one rank away are out of reach
    """
    return _LAST_STATS[-1] if _LAST_STATS else None


# ----------------------------------------------------------------------------- communication
class _Pending:
    """Posted P2P operations; ``wait()`` returns the receive buffers."""

    def __init__(self, reqs: list[Any], bufs: list[torch.Tensor], keep: tuple[torch.Tensor, ...]) -> None:
        self._reqs, self._bufs, self._keep = reqs, bufs, keep

    def wait(self) -> list[torch.Tensor]:
        for req in self._reqs:
            req.wait()
        bufs, self._bufs, self._keep, self._reqs = self._bufs, [], (), []  # hold nothing once done
        return bufs


_KV_TAG, _GRAD_TAG = 0, 2  # distinct tags (k, v: 0, 1; dk, dv: 2, 3): a kv and a gradient exchange may be
# in flight together


def _exchange(info: GroupInfo, sends: tuple[torch.Tensor, ...], dst: int, src: int, tag: int) -> _Pending:
    """Send ``sends`` to group rank dst and receive same-shaped tensors from src (async)."""
    bufs = [torch.empty_like(t) for t in sends]
    ops = [dist.P2POp(dist.isend, t, info.global_rank(dst), info.group, tag + i) for i, t in enumerate(sends)]
    ops += [dist.P2POp(dist.irecv, b, info.global_rank(src), info.group, tag + i) for i, b in enumerate(bufs)]
    return _Pending(dist.batch_isend_irecv(ops), bufs, sends)


# ----------------------------------------------------------------------------- forward / backward
def _merge_(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, lse_b: torch.Tensor) -> None:
    """out, lse (views, float32) ← the exact softmax merge of (out, lse) and (o, lse_b)."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))  # rows with no key yet
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).addcmul_(o, torch.exp(lse_b - safe).unsqueeze(-1))  # no temp
    lse.copy_(new)


def _ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, info: GroupInfo,
                  scale: float, softcap: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, n, _ = q.shape
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((B, H, n, v.shape[3]), dtype=acc_dtype, device=q.device)
    lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
    nxt, prv = (info.rank + 1) % info.world, (info.rank - 1) % info.world
    kv = (k, v)
    for t in range(plan.steps):
        pending = _exchange(info, kv, nxt, prv, _KV_TAG) if t + 1 < plan.steps else None  # next block in flight
        for task in plan.tasks[info.rank][t]:
            o, l = attention(q[:, :, task.q0:task.q1], kv[0][:, :, task.k0:task.k1], kv[1][:, :, task.k0:task.k1],
                             pattern=task.pattern, causal=task.causal, scale=scale, softcap=softcap,
                             backend=backend, return_lse=True)
            _merge_(out[:, :, task.q0:task.q1], lse[:, :, task.q0:task.q1], o, l)
            del o, l
        if pending is not None:
            kv = tuple(pending.wait())
    return out.to(q.dtype), lse


def _ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, plan: RingPlan, info: GroupInfo, scale: float, softcap: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, world = info.rank, info.world
    nxt, prv = (r + 1) % world, (r - 1) % world
    dq = _zeros(q)
    acc: list[torch.Tensor | None] = [None, None]  # dK / dV of the keys held at this step (owner r − t)
    kv = (k, v)
    for t in range(plan.steps):
        pending = _exchange(info, kv, nxt, prv, _KV_TAG) if t + 1 < plan.steps else None
        for task in plan.tasks[r][t]:
            if acc[0] is None:
                acc = [_zeros(k), _zeros(v)]
            qs, ks = slice(task.q0, task.q1), slice(task.k0, task.k1)
            # added into the accumulators' rows (inside the Triton kernels: no per-task gradients)
            attention_backward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], out[:, :, qs], dout[:, :, qs],
                               lse[:, :, qs], pattern=task.pattern, causal=task.causal, scale=scale,
                               softcap=softcap, backend=backend,
                               accumulate_into=(dq[:, :, qs], acc[0][:, :, ks], acc[1][:, :, ks]))
        if t + 1 < plan.steps:
            # Pass the accumulators on with the block they belong to; receive the next one's.
            # Not overlapped with compute: that would hold two more shard-sized buffers, and
            # the exchange is a small fraction of a step.
            # (The next block has arrived by now; taking it first frees the old one earlier.)
            kv = tuple(pending.wait()) if pending is not None else kv
            _pass_on(info, acc, (k, v), nxt, prv)
    del kv
    if plan.steps > 1:
        # The accumulators now held belong to rank r − (steps − 1): send them home.
        back = plan.steps - 1
        _pass_on(info, acc, (k, v), (r - back) % world, (r + back) % world)
    return dq, _or_zeros(acc[0], k), _or_zeros(acc[1], v)


def _pass_on(info: GroupInfo, acc: list, like: tuple[torch.Tensor, torch.Tensor], dst: int, src: int) -> None:
    """Send the dK / dV accumulators ``acc`` to dst and put src's in their place, one tensor after
    the other: the sent dK is freed (its only reference, ``acc[0]``, replaced) before dV's receive
    buffer exists, so the exchange holds one shard-sized buffer beyond the accumulators, not two
    (the backward's peak memory is at this exchange)."""
    for i in range(2):
        acc[i] = _exchange(info, (_or_zeros(acc[i], like[i]),), dst, src, _GRAD_TAG + i).wait()[0]


def _zeros(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, memory_format=torch.contiguous_format)


def _or_zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return _zeros(like) if t is None else t


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, info, scale, softcap, backend):  # type: ignore[override]
        k, v = k.contiguous(), v.contiguous()  # they are sent as they are
        out, lse = _ring_forward(q, k, v, plan, info, scale, softcap, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (plan, info, scale, softcap, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, *ctx.cfg)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------- public
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None, causal: bool = False,
                   layout: str = "zigzag", scale: float | None = None, pattern: Pattern | None = None,
                   softcap: float = 0.0, backend: str = "auto",
                   return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group`` (ring attention).

    Every rank passes its own shard (the same layout on every rank, see
    :func:`memattn.distributed.shard`) and gets the output rows of its queries; the result
    equals ``memattn.attention`` on the whole sequence (self-attention: queries and keys
    share positions). Differentiable; every rank must run the backward too.

    Args:
        q: (B, Hq, n, D) this rank's queries, n = N / W (even for zigzag).
        k: (B, Hkv, n, D) this rank's keys (Hq % Hkv == 0, GQA/MQA).
        v: (B, Hkv, n, Dv) this rank's values.
        group: the process group (None: the default one).
        causal: key position <= query position, on global positions.
        layout: "zigzag" (rank r holds chunks r and 2W−1−r of 2W; balances causal work)
            or "contiguous" (rank r holds chunk r of W).
        scale: score scale, default D ** -0.5.
        pattern: a :class:`memattn.patterns.Pattern` on global positions (with ``causal``:
            their intersection). Key blocks wholly outside it are skipped, and ranks
            whose keys no query can reach drop out of the ring.
        softcap: > 0 applies ``softcap · tanh(s / softcap)`` to scores.
        backend: as in :func:`memattn.attention` ("auto": Triton on CUDA, cpu otherwise);
            it must also provide ``attention_backward`` for gradients.
        return_lse: also return the float32 (B, Hq, n) log-sum-exp (no gradient flows through it).

    Returns:
        out (B, Hq, n, Dv) in q's dtype, or (out, lse).

    Raises:
        ValueError / TypeError: bad arguments, or shapes, dtypes or options that differ
            across ranks (checked up front on every rank, so all ranks raise together).
        RuntimeError: from torch.distributed when a rank dies or stalls; every collective
            and P2P wait is bounded by ``init_process_group(timeout=...)``.

    Example:
        >>> # torchrun --nproc_per_node=2 script.py, after init_process_group("gloo")
        >>> # from memattn.distributed import shard, ring_attention
        >>> # q_l, k_l, v_l = (shard(t, 2, "zigzag") for t in (q, k, v))
        >>> # out_l = ring_attention(q_l, k_l, v_l, causal=True)
        >>> # out_l.sum().backward()
    """
    scale = validate_inputs(q, k, v, scale=scale, softcap=softcap)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a memattn.patterns.Pattern or None, got {type(pattern).__name__}")
    if pattern is not None and pattern.num_heads not in (None, q.shape[1]):
        raise ValueError(f"pattern varies over {pattern.num_heads} heads but q has {q.shape[1]}")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"ring attention is self-attention: q and k shards must have one length, "
                         f"got q {q.shape[2]} and k {k.shape[2]}")
    n = q.shape[2]
    if layout == "zigzag" and n % 2:
        raise ValueError(f"q's shard length {n} must be even for the zigzag layout (two chunks per rank)")
    info = group_info(group)
    check_consistent(info, _comm_device(q), {
        "B": q.shape[0], "Hq": q.shape[1], "Hkv": k.shape[1], "n_local": n, "D": q.shape[3], "Dv": v.shape[3],
        "dtype": dtype_code(q.dtype), "device_type": text_hash(q.device.type), "causal": int(causal),
        "layout": LAYOUTS.index(layout), "pattern": text_hash(repr(pattern)), "scale": float_bits(scale),
        "softcap": float_bits(softcap), "backend": text_hash(backend)}, "ring_attention")
    plan = plan_ring(info.world, layout, n, causal=causal, pattern=pattern)
    _LAST_STATS[:] = [RingStats(info.world, info.rank, layout, plan.steps, plan.sources(info.rank),
                                plan.calls(info.rank), plan.chunk_pairs_computed(info.rank), plan.chunk_pairs_total)]
    out, lse = _RingAttention.apply(q, k, v, plan, info, scale, float(softcap), backend)
    return (out, lse) if return_lse else out
