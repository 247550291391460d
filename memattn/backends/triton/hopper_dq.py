"""The dQ pass of the two-pass backward in Gluon, for sm_90.

Written at the end of session 14 (compiled for sm_90 only: no spills, no serialised wgmma),
run first in session 15: ``tests/test_hopper.py`` on the H200, 48/48 with and without it
(bf16 and f16, D = 128, eight mask families, output, lse and the three gradients). At the
sliding window of 1024 and 64k tokens it takes 1.46 ms where the Triton dQ kernel takes 1.75
(``torch.profiler``, ``benchmarks/h200_profile_session15_call1_dq_*.json``): about 564 TFLOP/s
of its three products against 471. The launcher takes it by default wherever the other Gluon
kernels run (:func:`enabled`); ``MEMATTN_GLUON_DQ=0`` brings back the Triton dQ kernel.

Structure, as the other two Gluon kernels (:mod:`.hopper`): a producer warp loads the two
64-row halves of Q, dO and O once, then K and V tiles of 64 keys through a ring; two consumer
warpgroups own 64 query rows each. A consumer first computes delta = rowsum(dO·O) and
lse2 = lse·log2(e) of its rows and stores both for the dK/dV pass that follows (the Triton
dQ kernel's FUSE_PRE); then per key tile (:func:`_dq_tile`): S = Q Kᵀ and dP = dO Vᵀ in flight
together, P while dP finishes, dS = P (dP − delta), dQ += dS K. The loop takes two key tiles
per iteration (``DQ_PAIRS``, 4-9% faster in session 15): the first tile's dQ product stays in
flight while the second issues S and dP, and both finish at the end of the body, so no
product is in flight across the loop's back edge (that made ptxas serialise every wgmma,
warning C7515, in session 14's dK/dV experiment). With ``ACCUM`` (``accumulate_into``) the
epilogue adds dQ to what the dq tensor holds.
"""

from __future__ import annotations

import os

import torch

from .configs import TileConfig
from .hopper import GLUON_WARPS, HAVE_GLUON, _LOG2E, triton_cdiv
from .plans import _Plan, _run_plan

if HAVE_GLUON:
    from .hopper import (_add_stored, _key_blocks, _kv_ring, _load_kv_tiles, _pair_barriers, _row_ranges,
                         _tile_mask, _wgmma_layout)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )

__all__ = ["DQ_BLOCK_M", "DQ_BLOCK_N", "DQ_CONFIG", "enabled", "dq_plan", "run_dq"]

DQ_BLOCK_M = 128       # query rows per program (two consumer warpgroups of 64)
DQ_BLOCK_N = 64        # keys per tile: S and dP of a warpgroup are 64 x 64 (32 registers each)
_DQ_STAGES = {128: 3}
DQ_PAIRS = True        # two key tiles per loop iteration (_dq_consumer): 4-9% faster (session 15)
DQ_CONFIG = {d: TileConfig(DQ_BLOCK_M, DQ_BLOCK_N, GLUON_WARPS, s, True) for d, s in _DQ_STAGES.items()}


def enabled() -> bool:
    """Whether this kernel may take the dQ pass: yes unless MEMATTN_GLUON_DQ=0 (read per call,
    so tests and A/B timings can set it)."""
    return os.environ.get("MEMATTN_GLUON_DQ", "1") != "0"


if HAVE_GLUON:

    @gluon.jit
    def _dq_producer(q_desc, do_desc, o_desc, k_desc, v_desc, q_smem, do_smem, o_smem, k_smem, v_smem, rows_bar,
                     k_ready, v_ready, k_empty, v_empty, b, h, hk, m0, lo_b, n_tiles, STAGES: gl.constexpr):
        """Producer warp: the query halves of Q, dO and O, then K and V of every key tile."""
        HALF: gl.constexpr = q_desc.block_type.shape[2]
        mbarrier.expect(rows_bar, 2 * (q_desc.block_type.nbytes + do_desc.block_type.nbytes
                                       + o_desc.block_type.nbytes))
        for i in gl.static_range(2):
            tma.async_copy_global_to_shared(q_desc, [b, h, m0 + i * HALF, 0], rows_bar, q_smem.index(i))
            tma.async_copy_global_to_shared(do_desc, [b, h, m0 + i * HALF, 0], rows_bar, do_smem.index(i))
            tma.async_copy_global_to_shared(o_desc, [b, h, m0 + i * HALF, 0], rows_bar, o_smem.index(i))
        _load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk, lo_b, n_tiles,
                       STAGES)

    @gluon.jit
    def _dq_tile(t, dq, ds_prev, qh, doh, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, qi, cols, lse2, delta,
                 lo_r, hi_r, lo_b, flo_b, fhi_b, Nq, Nk, L, R, s_out, RETIRE_PREV: gl.constexpr,
                 HAS_DOCS: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, acc_layout: gl.constexpr):
        """Key tile ``t`` of a consumer's loop: S = Q Kᵀ and dP = dO Vᵀ in flight together (behind
        the previous tile's dQ product, if still in flight: with RETIRE_PREV the first wait
        retires it and releases its K slot); P while dP finishes; dS = P (dP − delta); then
        dQ += dS K, issued and left in flight. Returns dQ and that product's A operand."""
        HALF: gl.constexpr = qh.shape[0]
        HEAD_D: gl.constexpr = qh.shape[1]
        BN: gl.constexpr = k_smem.shape[3]
        dtype: gl.constexpr = qh.dtype
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        blk_n = lo_b + t
        slot = t % STAGES
        ph = (t // STAGES) & 1
        zero_s = gl.zeros([HALF, BN], gl.float32, s_layout)
        mbarrier.wait(k_ready.index(slot), ph)
        kt = k_smem.index(slot).reshape([BN, HEAD_D])
        s = warpgroup_mma(qh, kt.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(slot), ph)
        vt = v_smem.index(slot).reshape([BN, HEAD_D])
        dp = warpgroup_mma(doh, vt.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s, dq = warpgroup_mma_wait(1, deps=(s, dq, ds_prev, qh, kt))[:2]
        if RETIRE_PREV:
            mbarrier.arrive(k_empty.index((t - 1) % STAGES))
        p = gl.exp2(s * s_out - gl.expand_dims(lse2, 1))
        if (blk_n < flo_b) | (blk_n >= fhi_b):
            kj = gl.expand_dims(blk_n * BN + cols, 0)
            p = gl.where(_tile_mask(qi, kj, Nq, Nk, L, R, lo_r, hi_r, HAS_DOCS), p, 0.0)
        dp = warpgroup_mma_wait(0, deps=(dp, doh, vt))[0]
        mbarrier.arrive(v_empty.index(slot))
        ds = p * (dp - gl.expand_dims(delta, 1))
        ds_op = gl.convert_layout(ds.to(dtype), a_layout)
        dq = warpgroup_mma(ds_op, kt, dq, is_async=True)
        return dq, ds_op

    @gluon.jit
    def _dq_consumer(dq_desc, Lse, Lse2, Delta, DOC_ID, DOC_RANGE, q_smem, do_smem, o_smem, k_smem, v_smem,
                     rows_bar, acc_bar, k_ready, v_ready, k_empty, v_empty, bh, b, h, m0, lo_b, flo_b, fhi_b, n_tiles,
                     Nq, Nk, L, R, doc_pmin, lse_rs, s_out, scale,
                     HALF_ID: gl.constexpr, HAS_DOCS: gl.constexpr, STAGES: gl.constexpr, PAIRS: gl.constexpr,
                     ACCUM: gl.constexpr, s_layout: gl.constexpr, acc_layout: gl.constexpr):
        """One consumer warpgroup: delta and lse2 of rows [m0 + 64·HALF_ID, +64), then their dQ
        (:func:`_dq_tile` per key tile, two per iteration with PAIRS)."""
        HALF: gl.constexpr = q_smem.shape[3]
        HEAD_D: gl.constexpr = q_smem.shape[4]
        BN: gl.constexpr = k_smem.shape[3]
        dtype: gl.constexpr = q_smem.dtype
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

        qh = q_smem.index(HALF_ID).reshape([HALF, HEAD_D])
        doh = do_smem.index(HALF_ID).reshape([HALF, HEAD_D])
        oh = o_smem.index(HALF_ID).reshape([HALF, HEAD_D])
        r0 = m0 + HALF_ID * HALF
        rows = r0 + gl.arange(0, HALF, layout=row_s)
        qi = gl.expand_dims(rows, 1)
        cols = gl.arange(0, BN, layout=col_s)
        lo_r, hi_r = _row_ranges(rows, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS)

        # the preprocessing of these rows (rows past Nq: O and dO are zero-filled, lse -inf, so
        # delta = 0 and lse2 = +inf, the padding the dK/dV pass expects up to lse_rs)
        mbarrier.wait(rows_bar, 0)
        o = oh.load(blk).to(gl.float32)
        dov = doh.load(blk).to(gl.float32)
        delta = gl.convert_layout(gl.sum(o * dov, axis=1), row_s)
        lse = gl.load(Lse + bh.to(gl.int64) * Nq + rows, mask=rows < Nq, other=-float("inf"))
        lse2 = gl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)
        base = bh.to(gl.int64) * lse_rs
        gl.store(Delta + base + rows, delta, mask=rows < lse_rs)
        gl.store(Lse2 + base + rows, lse2, mask=rows < lse_rs)

        dq = warpgroup_mma_init(gl.zeros([HALF, HEAD_D], gl.float32, acc_layout))
        ds_op = gl.zeros([HALF, BN], dtype, a_layout)
        step: gl.constexpr = 2 if PAIRS else 1
        # with PAIRS two key tiles per iteration: the first tile's dQ product stays in flight
        # while the second issues its S and dP; nothing is in flight across the back edge (ptxas
        # would serialise every wgmma, C7515, as for the dK/dV kernel's session-14 CARRY form)
        for t0 in range(0, n_tiles - step + 1, step):
            for u in gl.static_range(step):
                dq, ds_op = _dq_tile(t0 + u, dq, ds_op, qh, doh, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                                     qi, cols, lse2, delta, lo_r, hi_r, lo_b, flo_b, fhi_b, Nq, Nk, L, R, s_out,
                                     u > 0, HAS_DOCS, STAGES, s_layout, acc_layout)
            dq = warpgroup_mma_wait(0, deps=(dq, ds_op))[0]
            mbarrier.arrive(k_empty.index((t0 + step - 1) % STAGES))
            dq = warpgroup_mma_init(dq)
        dq = warpgroup_mma_wait(0, deps=(dq, ds_op))[0]        # completed already: back to a plain tensor
        if PAIRS:
            if n_tiles % 2 == 1:
                dq, ds_op = _dq_tile(n_tiles - 1, dq, ds_op, qh, doh, k_smem, v_smem, k_ready, v_ready, k_empty,
                                     v_empty, qi, cols, lse2, delta, lo_r, hi_r, lo_b, flo_b, fhi_b, Nq, Nk, L, R,
                                     s_out, False, HAS_DOCS, STAGES, s_layout, acc_layout)
                dq = warpgroup_mma_wait(0, deps=(dq, ds_op))[0]
                mbarrier.arrive(k_empty.index((n_tiles - 1) % STAGES))

        dq = dq * scale
        if ACCUM:          # add the gradient already there (Q is no longer read)
            dq = _add_stored(dq_desc, [b, h, r0, 0], q_smem.index(HALF_ID), acc_bar, dq, 0, acc_layout)
        qh.store(dq.to(dtype))                               # Q is no longer read
        fence_async_shared()
        tma.async_copy_shared_to_global(dq_desc, [b, h, r0, 0], q_smem.index(HALF_ID))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _attn_bwd_dq_hopper(q_desc, do_desc, o_desc, k_desc, v_desc, dq_desc, Lse, Lse2, Delta, WIN, DOC_ID,
                            DOC_RANGE, Nq, Nk, Hq, GROUP, win_hs, doc_pmin, lse_rs, s_out, scale,
                            HAS_DOCS: gl.constexpr, STAGES: gl.constexpr, PAIRS: gl.constexpr,
                            ACCUM: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                            PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """Grid (cdiv(Nq, 128), B·Hq). q/do/o/dq: 4-D descriptors, blocks (1, 1, 64, D); k/v:
        (1, 1, 64, D). Lse: (B·Hq, Nq) natural log; Lse2 / Delta: written, rows lse_rs apart
        (lse_rs = 128·cdiv(Nq, 128): the grid covers the padding)."""
        HALF: gl.constexpr = q_desc.block_type.shape[2]
        HEAD_D: gl.constexpr = q_desc.block_type.shape[3]
        BN: gl.constexpr = k_desc.block_type.shape[2]
        BM: gl.constexpr = 2 * HALF
        dtype: gl.constexpr = q_desc.dtype
        gl.static_assert(num_warps == 4, "one warpgroup per consumer partition")
        s_layout: gl.constexpr = _wgmma_layout(BN)
        acc_layout: gl.constexpr = _wgmma_layout(HEAD_D)
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // GROUP
        m0 = pid_m * BM
        L = gl.load(WIN + 2 * h * win_hs)
        R = gl.load(WIN + 2 * h * win_hs + 1)
        lo_b, flo_b, fhi_b, hi_b = _key_blocks(m0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, BM, BN, HAS_DOCS)
        n_tiles = hi_b - lo_b        # may be 0: the rows then get dQ = 0 (and their delta / lse2)

        q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_D], do_desc.layout)
        o_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_D], o_desc.layout)
        k_smem, v_smem, k_ready, v_ready, k_empty, v_empty = _kv_ring(k_desc, v_desc, STAGES)
        rows_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(rows_bar, count=1)
        acc_bar = _pair_barriers()

        gl.warp_specialize(
            [(_dq_consumer, (dq_desc, Lse, Lse2, Delta, DOC_ID, DOC_RANGE, q_smem, do_smem, o_smem, k_smem, v_smem,
                             rows_bar, acc_bar.index(0), k_ready, v_ready, k_empty, v_empty, bh, b, h, m0, lo_b,
                             flo_b, fhi_b, n_tiles, Nq, Nk, L, R, doc_pmin, lse_rs, s_out, scale, 0, HAS_DOCS, STAGES,
                             PAIRS, ACCUM, s_layout, acc_layout)),
             (_dq_consumer, (dq_desc, Lse, Lse2, Delta, DOC_ID, DOC_RANGE, q_smem, do_smem, o_smem, k_smem, v_smem,
                             rows_bar, acc_bar.index(1), k_ready, v_ready, k_empty, v_empty, bh, b, h, m0, lo_b,
                             flo_b, fhi_b, n_tiles, Nq, Nk, L, R, doc_pmin, lse_rs, s_out, scale, 1, HAS_DOCS, STAGES,
                             PAIRS, ACCUM, s_layout, acc_layout)),
             (_dq_producer, (q_desc, do_desc, o_desc, k_desc, v_desc, q_smem, do_smem, o_smem, k_smem, v_smem,
                             rows_bar, k_ready, v_ready, k_empty, v_empty, b, h, hk, m0, lo_b, n_tiles, STAGES))],
            [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def dq_plan(q: torch.Tensor, k: torch.Tensor, window: torch.Tensor, doc_id: torch.Tensor | None,
            doc_range: torch.Tensor | None, doc_pmin: int, scale: float, lse_rs: int, accum: bool = False) -> _Plan:
    """The launch plan of the Gluon dQ pass (cached by the caller).

    Args:
        q: (B, Hq, Nq, 128); k: (B, Hkv, Nk, 128). window, doc_id, doc_range, doc_pmin: as
        :func:`.hopper.forward_plan`. scale: the softmax scale. lse_rs: the row stride of the lse2 /
        delta buffers; must be 128·cdiv(Nq, 128) (the parametric path's), which the grid covers.
        accum: add dQ to what the dq tensor holds (``accumulate_into``) instead of writing it.
    Returns:
        a :class:`~.plans._Plan` that :func:`run_dq` launches.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if lse_rs != triton_cdiv(Nq, DQ_BLOCK_M) * DQ_BLOCK_M:
        raise ValueError(f"lse_rs={lse_rs}: the Gluon dQ pass writes rows up to 128·cdiv(Nq, 128)")
    static = dict(WIN=window, DOC_ID=doc_id if doc_id is not None else window,
                  DOC_RANGE=doc_range if doc_range is not None else window, Nq=Nq, Nk=Nk, Hq=Hq, GROUP=Hq // Hkv,
                  win_hs=1 if window.shape[0] > 1 else 0, doc_pmin=doc_pmin, lse_rs=lse_rs, s_out=scale * _LOG2E,
                  scale=scale, HAS_DOCS=doc_id is not None, STAGES=_DQ_STAGES[D], PAIRS=DQ_PAIRS, ACCUM=bool(accum),
                  CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4)
    half = DQ_BLOCK_M // 2
    descs = tuple((n, n, rows, D, True) for n, rows in (("q_desc", half), ("do_desc", half), ("o_desc", half),
                                                       ("k_desc", DQ_BLOCK_N), ("v_desc", DQ_BLOCK_N),
                                                       ("dq_desc", half)))
    return _Plan(_attn_bwd_dq_hopper, (triton_cdiv(Nq, DQ_BLOCK_M), B * Hq), static, DQ_CONFIG[D], "dq", descs,
                 gluon=True)


def run_dq(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
           lse: torch.Tensor, dq: torch.Tensor, lse2: torch.Tensor, delta: torch.Tensor) -> None:
    """Launch a :func:`dq_plan`: dq (B, Hq, Nq, D) and the rows lse2 / delta (B·Hq, lse_rs).

    Args:
        q, out, dout, dq: (B, Hq, Nq, D), TMA-compatible strides; k, v: (B, Hkv, Nk, D);
        lse: float32 (B, Hq, Nq), natural log, contiguous.

    Example:
        >>> # on an H200 the launcher calls it as
        >>> # run_dq(dq_plan(q, k, win, None, None, 0, scale, lse_rs), q, k, v, out, do, lse, dq, lse2, delta)
    """
    _run_plan(plan, dict(q_desc=q, do_desc=dout, o_desc=out, k_desc=k, v_desc=v, dq_desc=dq, Lse=lse, Lse2=lse2,
                         Delta=delta), 0)
