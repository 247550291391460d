"""Hopper (sm_90) kernels written in Gluon: the forward and the backward's dK/dV pass (the
dQ pass is in :mod:`.hopper_dq`), each with two consumer warpgroups and a TMA producer warp.

Triton 3.6 does not emit, for sm_90, what the fastest Hopper attention kernels rely on: wgmma
products kept in flight across the softmax, and warpgroups that run independently of each
other (benchmarks/NOTES.md, sessions 10-14). Gluon (``triton.experimental.gluon``, shipped
with Triton 3.6) exposes both, so these kernels write them out. The forward:

* a **producer** partition (one warp, 24 registers) issues every TMA load: the two 64-row
  halves of the query tile, then K and V through a ring of ``STAGES`` slots, each slot reused
  once both consumers have released it (an ``empty`` mbarrier with count 2);
* two **consumer** partitions (one warpgroup each, 240 registers), 64 query rows apiece.
  Key tile t issues S_t = Q K_tᵀ, then O += P_{t-1} V_{t-1}, waits for S_t only, runs the
  softmax of S_t while the PV product is still in flight, then waits for it and rescales O.
  No barrier joins the two warpgroups inside the loop, so the warp schedulers let one run
  its products while the other runs its softmax.

The dK/dV pass (:func:`dkdv_plan`) has the same three partitions over a key block of 128 (64
keys per consumer), one query tile per loop iteration (:func:`_dkdv_tile`; two per iteration,
``BWD_PAIRS``, measured 20-25% slower in session 15). It runs after the dQ pass, which writes
the lse2 / delta rows it reads. With ``ACCUM`` (``accumulate_into``, the ring) its epilogue
adds to the gradients already stored.

Measured on the H200 (session 15's record, docs/performance.md), D = 128, all three Gluon
kernels, against FlexAttention in the same run, forward / forward+backward: dense 1.29-1.55x /
1.16-1.27x, the causal window of 1024 at 16k-128k 1.31-1.37x / 1.23-1.24x, 16 causal
documents 1.59x / 1.24x; against cuDNN 0.77-1.02x / 0.91-0.94x.

Scope: the parametric path (full, causal, windows per head, documents), float16 / bfloat16,
head dim 128 (:data:`ROUTED_DIMS`; the kernels build for 64 too, which measured slower than
Triton), no softcap or dropout, TMA-compatible strides (4-D descriptors: any B, H, N, D
strides, N edges clipped per head). The launcher sends everything else to the Triton kernels.
Masks follow the Triton kernels' conventions exactly (bottom-right aligned queries; rows
without a key get out 0 and lse -inf), and the lse is what the Triton backward reads.

``MEMATTN_GLUON=0`` turns this path off (A/B timing, or a Triton without Gluon).
"""

from __future__ import annotations

import os

import torch

try:  # Gluon ships with Triton >= 3.4; the Hopper module is what this file needs
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
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

from .configs import TileConfig
from .plans import _Plan, _run_plan

__all__ = ["HAVE_GLUON", "ROUTED_DIMS", "usable", "usable_dkdv", "forward_plan", "run_forward", "dkdv_plan",
           "run_dkdv", "gluon_descriptor", "set_enabled", "BLOCK_M", "BLOCK_N", "CONFIG", "BWD_CONFIG", "GLUON_WARPS"]

BLOCK_M = 128          # query rows per program (two consumer warpgroups of 64)
BLOCK_N = 128          # keys per tile
_STAGES = {64: 3, 128: 2}          # K / V ring depth per head dim (shared memory: 160 KiB at D = 128)
# Head dims the launcher sends here. D = 64 compiles and passed the H200 checks, but measured
# slower than the Triton kernels end to end (session 14: causal 1k / 4k / 16k fwd+bwd 0.84 /
# 0.93 / 0.98x, full 4k 0.93x; forward 1k 0.76x), so it stays on Triton.
ROUTED_DIMS = (128,)
GLUON_WARPS = 9         # 2 consumer warpgroups + 1 producer warp; marks the Gluon path in TileConfig
# What launch.last_configs()["fwd"] reports after a Gluon forward (override_configs(fwd=CONFIG[D])
# forces this path where it applies).
CONFIG = {d: TileConfig(BLOCK_M, BLOCK_N, GLUON_WARPS, s, True) for d, s in _STAGES.items()}
_ENABLED = [os.environ.get("MEMATTN_GLUON", "1") != "0"]
_LOG2E = 1.4426950408889634


def set_enabled(flag: bool) -> None:
    """Turn the Gluon forward on or off for this process (the default follows MEMATTN_GLUON)."""
    _ENABLED[0] = bool(flag)


if HAVE_GLUON:

    @gluon.constexpr_function
    def _wgmma_layout(n):
        """The register layout of a 64 x ``n`` wgmma accumulator of one 4-warp warpgroup."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _pair_barriers():
        """Two initialised mbarriers, one per consumer warpgroup (the accumulating epilogue's)."""
        bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(bars.index(i), count=1)
        return bars

    @gluon.jit
    def _tile_mask(qi, kj, Nq, Nk, L, R, lo_r, hi_r, HAS_DOCS: gl.constexpr):
        """Allowed pairs of a masked tile, as the Triton kernels' _row_tile_mask (parametric)."""
        if HAS_DOCS:
            return (kj >= lo_r) & (kj <= hi_r)
        d = qi + (Nk - Nq) - kj
        return (qi < Nq) & (kj < Nk) & (d <= L) & (d >= -R)

    @gluon.jit
    def _softmax(s, m_i, qi, kj, Nq, Nk, L, R, lo_r, hi_r, qk_scale,
                 MASKED: gl.constexpr, HAS_DOCS: gl.constexpr):
        """One tile's online-softmax step in log2 units: (new row max, P, rescale factor)."""
        if MASKED:
            s = gl.where(_tile_mask(qi, kj, Nq, Nk, L, R, lo_r, hi_r, HAS_DOCS), s, -float("inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        if MASKED:
            m_use = gl.where(m_new == -float("inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        return m_new, p, gl.exp2(m_i - m_use)

    @gluon.jit
    def _row_ranges(rows, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS: gl.constexpr):
        """With documents, each query row's allowed keys as one inclusive range [lo, hi], both
        [rows, 1] (the window, the keys and the row's document; hi = -1 past Nq), as the Triton
        kernels' _row_bounds; without, placeholders the masks do not read."""
        qi = gl.expand_dims(rows, 1)
        lo_r = qi
        hi_r = qi
        if HAS_DOCS:       # documents are contiguous, so "same document" is a key range
            qpos = rows + (Nk - Nq)
            d = gl.load(DOC_ID + (gl.minimum(rows, Nq - 1) + (Nk - Nq) - doc_pmin))
            lo = gl.maximum(gl.maximum(qpos - L, 0), gl.load(DOC_RANGE + 2 * d))
            hi = gl.minimum(gl.minimum(qpos + R, Nk - 1), gl.load(DOC_RANGE + 2 * d + 1) - 1)
            lo_r = gl.expand_dims(lo, 1)
            hi_r = gl.expand_dims(gl.where(rows < Nq, hi, -1), 1)
        return lo_r, hi_r

    @gluon.jit
    def _key_blocks(m0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, BM: gl.constexpr, BN: gl.constexpr,
                    HAS_DOCS: gl.constexpr):
        """Key blocks of BN that query rows [m0, m0 + BM) visit: [lo_b, hi_b), of which
        [flo_b, fhi_b) need no predicate (the Triton kernels' _kv_block_range / _blocks_of)."""
        m_last = gl.minimum(m0 + BM, Nq) - 1
        q_first = m0 + (Nk - Nq)
        q_last = m_last + (Nk - Nq)
        lo = gl.maximum(q_first - L, 0)
        hi = gl.minimum(q_last + R + 1, Nk)
        flo = gl.maximum(q_last - L, 0)
        fhi = gl.minimum(q_first + R + 1, Nk)
        if HAS_DOCS:
            d_first = gl.load(DOC_ID + (q_first - doc_pmin))
            d_last = gl.load(DOC_ID + (q_last - doc_pmin))
            lo = gl.maximum(lo, gl.load(DOC_RANGE + 2 * d_first))
            hi = gl.minimum(hi, gl.load(DOC_RANGE + 2 * d_last + 1))
            flo = gl.maximum(flo, gl.load(DOC_RANGE + 2 * d_last))
            fhi = gl.minimum(fhi, gl.load(DOC_RANGE + 2 * d_first + 1))
        return _blocks(lo, hi, flo, fhi, BN)

    @gluon.jit
    def _blocks(lo, hi, flo, fhi, BLOCK: gl.constexpr):
        """Index ranges [lo, hi) (all) and [flo, fhi) (no predicate) to block ranges
        lo_b <= flo_b <= fhi_b <= hi_b (the Triton kernels' _blocks_of)."""
        hi = gl.maximum(hi, lo)
        fhi = gl.maximum(fhi, flo)
        lo_b = lo // BLOCK
        hi_b = gl.where(hi > lo, (hi + BLOCK - 1) // BLOCK, lo_b)
        flo_b = gl.minimum(gl.maximum((flo + BLOCK - 1) // BLOCK, lo_b), hi_b)
        fhi_b = gl.minimum(gl.maximum(fhi // BLOCK, flo_b), hi_b)
        return lo_b, flo_b, fhi_b, hi_b

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                  b, h, hk, m0, lo_b, n_tiles, STAGES: gl.constexpr):
        """Producer warp: both query halves, then K and V of every tile through the ring."""
        HALF: gl.constexpr = q_desc.block_type.shape[2]
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, m0, 0], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [b, h, m0 + HALF, 0], q_bar, q_smem.index(1))
        _load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk, lo_b, n_tiles,
                       STAGES)

    @gluon.jit
    def _load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, b, hk, lo_b, n_tiles,
                       STAGES: gl.constexpr):
        """A producer's key loop: K and V of key blocks lo_b, lo_b + 1, ... through the ring of
        STAGES slots, each reused once its consumers have arrived on its `empty` barrier."""
        BN: gl.constexpr = k_desc.block_type.shape[2]
        for t in range(n_tiles):
            slot = t % STAGES
            ph = ((t // STAGES) & 1) ^ 1          # a fresh barrier passes a wait on parity 1
            n0 = (lo_b + t) * BN
            mbarrier.wait(k_empty.index(slot), ph)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, hk, n0, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), ph)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, hk, n0, 0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _kv_ring(k_desc, v_desc, STAGES: gl.constexpr):
        """Shared memory of a K / V ring and its barriers: (k, v, k_ready, v_ready, k_empty,
        v_empty); `empty` counts the two consumer warpgroups."""
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        return k_smem, v_smem, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _add_stored(desc, coord, buf, bar, x, phase, layout: gl.constexpr):
        """x + the tile ``desc`` holds at ``coord`` (float32): a TMA load into the shared buffer
        ``buf`` (free by then), waited on ``bar`` at ``phase``. The epilogue of an accumulating
        backward (``accumulate_into``: the ring adds each step's gradients in place)."""
        mbarrier.expect(bar, desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, coord, bar, buf)
        mbarrier.wait(bar, phase)
        return x + buf.reshape([buf.shape[2], buf.shape[3]]).load(layout).to(gl.float32)

    @gluon.jit
    def _consumer(o_desc, Lse, DOC_ID, DOC_RANGE, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                  v_empty, b, h, bh, m0, lo_b, flo_b, fhi_b, n_tiles, Nq, Nk, L, R, doc_pmin, qk_scale,
                  HALF_ID: gl.constexpr, HAS_DOCS: gl.constexpr, STAGES: gl.constexpr,
                  s_layout: gl.constexpr, o_layout: gl.constexpr):
        """One consumer warpgroup: rows [m0 + 64·HALF_ID, +64) against every key tile, then
        their output (TMA store, clipped at Nq) and lse."""
        HALF: gl.constexpr = q_smem.shape[3]
        HEAD_D: gl.constexpr = q_smem.shape[4]
        BN: gl.constexpr = k_smem.shape[3]
        dtype: gl.constexpr = q_smem.dtype
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        qh = q_smem.index(HALF_ID).reshape([HALF, HEAD_D])
        r0 = m0 + HALF_ID * HALF
        rows = r0 + gl.arange(0, HALF, layout=row_s)
        qi = gl.expand_dims(rows, 1)
        cols = gl.arange(0, BN, layout=col_s)
        lo_r, hi_r = _row_ranges(rows, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS)

        zero_s = gl.zeros([HALF, BN], gl.float32, s_layout)
        acc = gl.zeros([HALF, HEAD_D], gl.float32, o_layout)
        m_i = gl.full([HALF], -float("inf"), gl.float32, row_s)

        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        k0 = k_smem.index(0).reshape([BN, HEAD_D])
        s = warpgroup_mma(qh, k0.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, qh, k0))[0]
        mbarrier.arrive(k_empty.index(0))
        kj = gl.expand_dims(lo_b * BN + cols, 0)
        if (lo_b < flo_b) | (lo_b >= fhi_b):
            m_i, p, alpha = _softmax(s, m_i, qi, kj, Nq, Nk, L, R, lo_r, hi_r, qk_scale, True, HAS_DOCS)
        else:
            m_i, p, alpha = _softmax(s, m_i, qi, kj, Nq, Nk, L, R, lo_r, hi_r, qk_scale, False, HAS_DOCS)
        l_i = gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for t in range(1, n_tiles):
            blk = lo_b + t
            slot = t % STAGES
            prev = (t - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
            kt = k_smem.index(slot).reshape([BN, HEAD_D])
            s = warpgroup_mma(qh, kt.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((t - 1) // STAGES) & 1)
            vp = v_smem.index(prev).reshape([BN, HEAD_D])
            acc = warpgroup_mma(p_op, vp, acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, kt))[0]          # S_t done; the PV product runs on
            mbarrier.arrive(k_empty.index(slot))
            kj = gl.expand_dims(blk * BN + cols, 0)
            if (blk < flo_b) | (blk >= fhi_b):
                m_i, p, alpha = _softmax(s, m_i, qi, kj, Nq, Nk, L, R, lo_r, hi_r, qk_scale, True, HAS_DOCS)
            else:
                m_i, p, alpha = _softmax(s, m_i, qi, kj, Nq, Nk, L, R, lo_r, hi_r, qk_scale, False, HAS_DOCS)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            acc = warpgroup_mma_wait(0, deps=(acc, p_op, vp))[0]
            mbarrier.arrive(v_empty.index(prev))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        last = (n_tiles - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
        vl = v_smem.index(last).reshape([BN, HEAD_D])
        acc = warpgroup_mma(p_op, vl, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, p_op, vl))[0]
        mbarrier.arrive(v_empty.index(last))

        has = l_i > 0.0                                      # rows with no allowed key: out 0, lse -inf
        l_safe = gl.where(has, l_i, 1.0)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
        qh.store(out.to(dtype))                              # the query half is no longer read
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, h, r0, 0], q_smem.index(HALF_ID))
        lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, -float("inf"))
        gl.store(Lse + bh.to(gl.int64) * Nq + rows, lse, mask=rows < Nq)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _attn_fwd_hopper(q_desc, k_desc, v_desc, o_desc, Lse, WIN, DOC_ID, DOC_RANGE,
                         Nq, Nk, Hq, GROUP, win_hs, doc_pmin, qk_scale,
                         HAS_DOCS: gl.constexpr, REVERSE: gl.constexpr, STAGES: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """Grid (cdiv(Nq, 128), B·Hq). q/o: 4-D descriptors, blocks (1, 1, 64, D); k/v: (1, 1, 128, D)."""
        HALF: gl.constexpr = q_desc.block_type.shape[2]
        HEAD_D: gl.constexpr = q_desc.block_type.shape[3]
        BN: gl.constexpr = k_desc.block_type.shape[2]
        BM: gl.constexpr = 2 * HALF
        dtype: gl.constexpr = q_desc.dtype
        gl.static_assert(num_warps == 4, "one warpgroup per consumer partition")
        s_layout: gl.constexpr = _wgmma_layout(BN)
        o_layout: gl.constexpr = _wgmma_layout(HEAD_D)
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        if REVERSE:                                          # causal: the longest rows first
            pid_m = gl.num_programs(0) - 1 - pid_m
        b = bh // Hq
        h = bh % Hq
        hk = h // GROUP
        m0 = pid_m * BM
        L = gl.load(WIN + 2 * h * win_hs)
        R = gl.load(WIN + 2 * h * win_hs + 1)

        lo_b, flo_b, fhi_b, hi_b = _key_blocks(m0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, BM, BN, HAS_DOCS)
        # at least one tile: a program whose rows see no key runs one fully masked tile, which
        # leaves l = 0 (out 0, lse -inf); its TMA box may lie past Nk (zero-filled)
        n_tiles = gl.maximum(hi_b - lo_b, 1)

        q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BN, HEAD_D], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)

        gl.warp_specialize(
            [(_consumer, (o_desc, Lse, DOC_ID, DOC_RANGE, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                          v_empty, b, h, bh, m0, lo_b, flo_b, fhi_b, n_tiles, Nq, Nk, L, R, doc_pmin, qk_scale,
                          0, HAS_DOCS, STAGES, s_layout, o_layout)),
             (_consumer, (o_desc, Lse, DOC_ID, DOC_RANGE, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                          v_empty, b, h, bh, m0, lo_b, flo_b, fhi_b, n_tiles, Nq, Nk, L, R, doc_pmin, qk_scale,
                          1, HAS_DOCS, STAGES, s_layout, o_layout)),
             (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                          v_empty, b, h, hk, m0, lo_b, n_tiles, STAGES))],
            [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


if HAVE_GLUON:

    @gluon.jit
    def _bwd_producer(q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, kv_bar, ready, empty,
                      b, hk, n0, lo_b, n_tiles, GROUP, STAGES: gl.constexpr):
        """Producer warp of the dK/dV kernel: the two 64-key halves of K and V once, then Q and dO
        of every (query head of the group, query tile) through the ring."""
        HALF: gl.constexpr = k_desc.block_type.shape[2]
        BM: gl.constexpr = q_desc.block_type.shape[2]
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
        for i in gl.static_range(2):
            tma.async_copy_global_to_shared(k_desc, [b, hk, n0 + i * HALF, 0], kv_bar, k_smem.index(i))
            tma.async_copy_global_to_shared(v_desc, [b, hk, n0 + i * HALF, 0], kv_bar, v_smem.index(i))
        for it in range(GROUP * n_tiles):
            g = it // n_tiles
            m0 = (lo_b + it % n_tiles) * BM
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, hk * GROUP + g, m0, 0], ready.index(slot), q_smem.index(slot))
            tma.async_copy_global_to_shared(do_desc, [b, hk * GROUP + g, m0, 0], ready.index(slot),
                                            do_smem.index(slot))

    @gluon.jit
    def _dkdv_tile(it, dk, dv, p_prev, ds_prev, kh, vh, q_smem, do_smem, ready, empty, Lse2, Delta, b, hk, kj2,
                   lo_c, hi_c, lo_b, flo_b, fhi_b, n_tiles, GROUP, Hq, Nq, Nk, L, R, lse_rs, s_out,
                   HAS_DOCS: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, acc_layout: gl.constexpr):
        """Query tile ``it`` of a consumer's loop: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ in flight together
        (behind the previous tile's dV / dK products, if still in flight: the first wait retires
        them, and releases the previous tile's ring slot); Pᵀ while dPᵀ finishes; dV += Pᵀ dO in
        flight while dSᵀ is formed; then dK += dSᵀ Q, issued and left in flight. Returns the
        accumulators and the A operands of the two products in flight (live until they finish)."""
        HALF: gl.constexpr = kh.shape[0]
        HEAD_D: gl.constexpr = kh.shape[1]
        BM: gl.constexpr = q_smem.shape[3]
        dtype: gl.constexpr = kh.dtype
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)      # one value per query
        vec: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        g = it // n_tiles
        blk = lo_b + it % n_tiles
        m0 = blk * BM
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        qt = q_smem.index(slot).reshape([BM, HEAD_D])
        dot = do_smem.index(slot).reshape([BM, HEAD_D])
        zero_s = gl.zeros([HALF, BM], gl.float32, s_layout)
        st = warpgroup_mma(kh, qt.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dpt = warpgroup_mma(vh, dot.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        row = (b * Hq + hk * GROUP + g).to(gl.int64) * lse_rs + m0
        # compact (one value per thread) until used: replicated per column they cost 32
        # registers across the waits, enough to make the warpgroup spill at D = 128
        cols_c = gl.arange(0, BM, layout=vec)
        lse2_c = gl.load(Lse2 + row + cols_c)
        delta_c = gl.load(Delta + row + cols_c)
        st, dv, dk = warpgroup_mma_wait(1, deps=(st, dv, dk, p_prev, ds_prev, kh, qt))[:3]
        if it > 0:     # the previous tile's slot: its dV and dK products have completed
            mbarrier.arrive(empty.index((it - 1) % STAGES))
        pt = gl.exp2(st * s_out - gl.expand_dims(gl.convert_layout(lse2_c, col_s), 0))
        if (blk < flo_b) | (blk >= fhi_b):
            qi = gl.expand_dims(m0 + gl.arange(0, BM, layout=col_s), 0)
            if HAS_DOCS:
                ok = (qi >= lo_c) & (qi <= hi_c)
            else:
                dd = qi + (Nk - Nq) - kj2
                ok = (qi < Nq) & (kj2 < Nk) & (dd <= L) & (dd >= -R)
            pt = gl.where(ok, pt, 0.0)
        p_op = gl.convert_layout(pt.to(dtype), a_layout)
        dv = warpgroup_mma(p_op, dot, dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=(dpt, vh, dot))[0]
        dst = pt * (dpt - gl.expand_dims(gl.convert_layout(delta_c, col_s), 0))
        ds_op = gl.convert_layout(dst.to(dtype), a_layout)
        dk = warpgroup_mma(ds_op, qt, dk, is_async=True)
        return dk, dv, p_op, ds_op

    @gluon.jit
    def _bwd_consumer(dk_desc, dv_desc, Lse2, Delta, DOC_ID, DOC_RANGE, q_smem, k_smem, v_smem, do_smem, kv_bar,
                      ready, empty, acc_bar, b, hk, n0, lo_b, flo_b, fhi_b, n_tiles, GROUP, Hq, Nq, Nk, L, R, doc_pmin,
                      lse_rs, s_out, scale,
                      HALF_ID: gl.constexpr, HAS_DOCS: gl.constexpr, STAGES: gl.constexpr, PAIRS: gl.constexpr,
                      ACCUM: gl.constexpr, s_layout: gl.constexpr, acc_layout: gl.constexpr):
        """One consumer warpgroup: dK and dV of keys [n0 + 64·HALF_ID, +64) over every query tile
        (:func:`_dkdv_tile`). With PAIRS the loop takes two tiles per iteration: the first
        tile's dV / dK products stay in flight while the second issues its Sᵀ and dPᵀ, and all
        finish at the end of the iteration. Nothing is in flight across the loop's back edge:
        that (session 14's CARRY) made ptxas serialise every wgmma (warning C7515). Without
        PAIRS each tile's products finish at its end; the other warpgroup fills the tensor
        cores meanwhile."""
        HALF: gl.constexpr = k_smem.shape[3]
        HEAD_D: gl.constexpr = k_smem.shape[4]
        BM: gl.constexpr = q_smem.shape[3]
        dtype: gl.constexpr = k_smem.dtype
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)      # one value per key

        kh = k_smem.index(HALF_ID).reshape([HALF, HEAD_D])
        vh = v_smem.index(HALF_ID).reshape([HALF, HEAD_D])
        kj = n0 + HALF_ID * HALF + gl.arange(0, HALF, layout=row_s)
        kj2 = gl.expand_dims(kj, 1)
        lo_c = kj2
        hi_c = kj2
        if HAS_DOCS:       # each key's allowed query rows as one range (as _col_bounds)
            off = Nk - Nq
            d = gl.load(DOC_ID + (gl.minimum(kj, Nk - 1) - doc_pmin))
            lo = gl.maximum(gl.maximum(kj - R - off, 0), gl.load(DOC_RANGE + 2 * d) - off)
            hi = gl.minimum(gl.minimum(kj + L - off, Nq - 1), gl.load(DOC_RANGE + 2 * d + 1) - 1 - off)
            lo_c = gl.expand_dims(lo, 1)
            hi_c = gl.expand_dims(gl.where(kj < Nk, hi, -1), 1)

        dk = warpgroup_mma_init(gl.zeros([HALF, HEAD_D], gl.float32, acc_layout))
        dv = warpgroup_mma_init(gl.zeros([HALF, HEAD_D], gl.float32, acc_layout))
        p_op = gl.zeros([HALF, BM], dtype, a_layout)
        ds_op = gl.zeros([HALF, BM], dtype, a_layout)
        mbarrier.wait(kv_bar, 0)
        total = GROUP * n_tiles
        step: gl.constexpr = 2 if PAIRS else 1
        for it0 in range(0, total - step + 1, step):
            for u in gl.static_range(step):
                dk, dv, p_op, ds_op = _dkdv_tile(it0 + u, dk, dv, p_op, ds_op, kh, vh, q_smem, do_smem, ready, empty,
                                                 Lse2, Delta, b, hk, kj2, lo_c, hi_c, lo_b, flo_b, fhi_b, n_tiles,
                                                 GROUP, Hq, Nq, Nk, L, R, lse_rs, s_out, HAS_DOCS, STAGES, s_layout,
                                                 acc_layout)
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))[:2]
            dv = warpgroup_mma_init(dv)
            dk = warpgroup_mma_init(dk)
        dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))[:2]     # completed already: back to plain tensors
        if PAIRS:
            if total % 2 == 1:
                dk, dv, p_op, ds_op = _dkdv_tile(total - 1, dk, dv, p_op, ds_op, kh, vh, q_smem, do_smem, ready,
                                                 empty, Lse2, Delta, b, hk, kj2, lo_c, hi_c, lo_b, flo_b, fhi_b,
                                                 n_tiles, GROUP, Hq, Nq, Nk, L, R, lse_rs, s_out, HAS_DOCS, STAGES,
                                                 s_layout, acc_layout)
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))[:2]
        mbarrier.arrive(empty.index((total - 1) % STAGES))

        dk = dk * scale
        if ACCUM:          # add the gradients already there (K / V are no longer read)
            row0 = n0 + HALF_ID * HALF
            dk = _add_stored(dk_desc, [b, hk, row0, 0], k_smem.index(HALF_ID), acc_bar, dk, 0, acc_layout)
            dv = _add_stored(dv_desc, [b, hk, row0, 0], v_smem.index(HALF_ID), acc_bar, dv, 1, acc_layout)
        kh.store(dk.to(dtype))                                # K / V are no longer read
        vh.store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [b, hk, n0 + HALF_ID * HALF, 0], k_smem.index(HALF_ID))
        tma.async_copy_shared_to_global(dv_desc, [b, hk, n0 + HALF_ID * HALF, 0], v_smem.index(HALF_ID))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _attn_bwd_dkdv_hopper(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, Lse2, Delta, WIN, DOC_ID,
                              DOC_RANGE, Nq, Nk, Hq, Hkv, GROUP, win_hs, doc_pmin, lse_rs, s_out, scale,
                              HAS_DOCS: gl.constexpr, STAGES: gl.constexpr, PAIRS: gl.constexpr,
                              ACCUM: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                              num_warps: gl.constexpr):
        """Grid (cdiv(Nk, 128), B·Hkv). q/do: 4-D descriptors, blocks (1, 1, 64, D); k/v/dk/dv:
        (1, 1, 64, D). Lse2 / Delta: the backward's padded rows (B·Hq, lse_rs)."""
        HALF: gl.constexpr = k_desc.block_type.shape[2]
        HEAD_D: gl.constexpr = k_desc.block_type.shape[3]
        BM: gl.constexpr = q_desc.block_type.shape[2]
        BN: gl.constexpr = 2 * HALF
        dtype: gl.constexpr = k_desc.dtype
        gl.static_assert(num_warps == 4, "one warpgroup per consumer partition")
        s_layout: gl.constexpr = _wgmma_layout(BM)
        acc_layout: gl.constexpr = _wgmma_layout(HEAD_D)
        pid_n = gl.program_id(0)
        bhk = gl.program_id(1)
        b = bhk // Hkv
        hk = bhk % Hkv
        n0 = pid_n * BN
        h0 = hk * GROUP            # the window of the group's first head (per-head windows: Triton)
        L = gl.load(WIN + 2 * h0 * win_hs)
        R = gl.load(WIN + 2 * h0 * win_hs + 1)

        # query blocks of BM that keys [n0, n0 + BN) visit ([flo_b, fhi_b) need no predicate),
        # as _q_block_range
        n_last = gl.minimum(n0 + BN, Nk) - 1
        lo = n0 - R
        hi = n_last + L + 1
        flo = n_last - R
        fhi = n0 + L + 1
        if HAS_DOCS:
            d_first = gl.load(DOC_ID + (n0 - doc_pmin))
            d_last = gl.load(DOC_ID + (n_last - doc_pmin))
            lo = gl.maximum(lo, gl.load(DOC_RANGE + 2 * d_first))
            hi = gl.minimum(hi, gl.load(DOC_RANGE + 2 * d_last + 1))
            flo = gl.maximum(flo, gl.load(DOC_RANGE + 2 * d_last))
            fhi = gl.minimum(fhi, gl.load(DOC_RANGE + 2 * d_first + 1))
        off = Nk - Nq
        lo_b, flo_b, fhi_b, hi_b = _blocks(gl.maximum(lo - off, 0), gl.minimum(hi - off, Nq),
                                           gl.maximum(flo - off, 0), gl.minimum(fhi - off, Nq), BM)
        # at least one tile, fully masked when no query sees these keys: dK = dV = 0 then
        n_tiles = gl.maximum(hi_b - lo_b, 1)

        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BM, HEAD_D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BM, HEAD_D], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF, HEAD_D], v_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        acc_bar = _pair_barriers()
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)

        gl.warp_specialize(
            [(_bwd_consumer, (dk_desc, dv_desc, Lse2, Delta, DOC_ID, DOC_RANGE, q_smem, k_smem, v_smem, do_smem,
                              kv_bar, ready, empty, acc_bar.index(0), b, hk, n0, lo_b, flo_b, fhi_b, n_tiles, GROUP,
                              Hq, Nq, Nk, L, R, doc_pmin, lse_rs, s_out, scale, 0, HAS_DOCS, STAGES, PAIRS, ACCUM,
                              s_layout, acc_layout)),
             (_bwd_consumer, (dk_desc, dv_desc, Lse2, Delta, DOC_ID, DOC_RANGE, q_smem, k_smem, v_smem, do_smem,
                              kv_bar, ready, empty, acc_bar.index(1), b, hk, n0, lo_b, flo_b, fhi_b, n_tiles, GROUP,
                              Hq, Nq, Nk, L, R, doc_pmin, lse_rs, s_out, scale, 1, HAS_DOCS, STAGES, PAIRS, ACCUM,
                              s_layout, acc_layout)),
             (_bwd_producer, (q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, kv_bar, ready,
                              empty, b, hk, n0, lo_b, n_tiles, GROUP, STAGES))],
            [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_SM90: dict[int, bool] = {}


def _capability_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    hit = _SM90.get(idx)
    if hit is None:
        hit = _SM90[idx] = torch.cuda.get_device_capability(idx)[0] == 9
    return hit


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_map: bool, softcap: float, dropout_p: float,
           tma_ok: bool) -> bool:
    """Whether the Gluon forward takes this call (else the Triton kernel does).

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D). has_map: the mask needs the block-map path.
        softcap, dropout_p: the call's options (either set: Triton). tma_ok: TMA-compatible strides.
    Returns:
        True for float16 / bfloat16, D = Dv in :data:`ROUTED_DIMS` (128), the parametric path,
        no softcap or dropout, on an sm_90 GPU with Gluon, the path enabled, and at least one
        full query tile.
    """
    if not (HAVE_GLUON and _ENABLED[0]) or has_map or softcap > 0 or dropout_p > 0 or not tma_ok:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] not in ROUTED_DIMS or v.shape[3] != q.shape[3]:
        return False
    if q.shape[2] < BLOCK_M or torch.compiler.is_compiling():
        return False                                   # decoding shapes keep the split-KV Triton path
    return _capability_ok(q.device)


_LAYOUTS: dict[tuple, object] = {}


def gluon_descriptor(t: torch.Tensor, block: list[int]) -> "TensorDescriptor":
    """A Gluon TMA descriptor of ``t`` (any rank, TMA-compatible strides) with blocks ``block``
    and the default NVMMA shared layout of that block (the kernels allocate their buffers with
    the descriptor's layout). Plans build these for a first launch; their direct launches pass
    the tensors and reuse the encoded maps (plans._Direct)."""
    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    key = (tuple(block), t.dtype)
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for(list(block), gdt)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), lay)


def _desc(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    return gluon_descriptor(t, [1, 1, rows, t.shape[3]])


def forward_plan(q: torch.Tensor, k: torch.Tensor, window: torch.Tensor, doc_id: torch.Tensor | None,
                 doc_range: torch.Tensor | None, doc_pmin: int, scale: float, reverse: bool) -> _Plan:
    """The launch plan of the Gluon forward for these shapes and this mask (the launcher caches
    it): everything but the per-call tensors, which :func:`run_forward` passes.

    Args:
        q: (B, Hq, Nq, 128); k: (B, Hkv, Nk, 128); TMA-compatible strides (see :func:`usable`).
        window: int32 (1 or Hq, 2) [left, right] per head; doc_id / doc_range / doc_pmin: the
            documents of :class:`~.masks.MaskSpec` or None.
        scale: the softmax scale. reverse: run the query tiles last-first (causal masks).
    Returns:
        a :class:`~.plans._Plan` on the grid (cdiv(Nq, 128), B·Hq).

    Example:
        >>> # on an H200 (launch.forward does this for the calls usable() accepts):
        >>> # plan = forward_plan(q, k, win, None, None, 0, q.shape[-1] ** -0.5, True)
        >>> # run_forward(plan, q, k, v, out, lse)
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    static = dict(WIN=window, DOC_ID=doc_id if doc_id is not None else window,
                  DOC_RANGE=doc_range if doc_range is not None else window, Nq=Nq, Nk=Nk, Hq=Hq, GROUP=Hq // Hkv,
                  win_hs=1 if window.shape[0] > 1 else 0, doc_pmin=doc_pmin, qk_scale=scale * _LOG2E,
                  HAS_DOCS=doc_id is not None, REVERSE=reverse, STAGES=_STAGES[D], CONSUMER_REGS=240,
                  PRODUCER_REGS=24, num_warps=4)
    half = BLOCK_M // 2
    descs = (("q_desc", "q_desc", half, D, True), ("k_desc", "k_desc", BLOCK_N, D, True),
             ("v_desc", "v_desc", BLOCK_N, D, True), ("o_desc", "o_desc", half, D, True))
    return _Plan(_attn_fwd_hopper, (triton_cdiv(Nq, BLOCK_M), B * Hq), static, CONFIG[D], "fwd", descs,
                 gluon=True)


def run_forward(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor) -> None:
    """Launch a :func:`forward_plan` into ``out`` (B, Hq, Nq, D) and ``lse`` (B, Hq, Nq) float32
    (natural log; rows without a key: out 0, lse -inf), both written in full; q, k, v as the
    plan's (same shapes, strides and dtype)."""
    _run_plan(plan, dict(q_desc=q, k_desc=k, v_desc=v, o_desc=out, Lse=lse), 0)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_BWD_STAGES = {64: 3, 128: 3}      # Q / dO ring depth of the dK/dV kernel (160 KiB at D = 128)
BWD_PAIRS = False                  # two query tiles per loop iteration: 7-25% slower (session 15)
BWD_CONFIG = {d: TileConfig(64, BLOCK_N, GLUON_WARPS, s, True) for d, s in _BWD_STAGES.items()}


def usable_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: torch.Tensor | None, has_map: bool,
                softcap: float, dropout_p: float, tma_ok: bool) -> bool:
    """Whether the Gluon dK/dV kernel takes a two-pass backward's key-block pass.

    Args:
        as :func:`usable`, and ``window`` the (1 or Hq, 2) windows: per-head windows need one
        query head per kv head here (the kernel walks a GQA group with one window).
    Returns:
        :func:`usable`'s answer, narrowed by that rule.
    """
    if not usable(q, k, v, has_map, softcap, dropout_p, tma_ok):
        return False
    return window is not None and (window.shape[0] == 1 or q.shape[1] == k.shape[1])


def dkdv_plan(q: torch.Tensor, k: torch.Tensor, window: torch.Tensor, doc_id: torch.Tensor | None,
              doc_range: torch.Tensor | None, doc_pmin: int, scale: float, lse_rs: int, accum: bool = False) -> _Plan:
    """The launch plan of the Gluon dK/dV kernel, the key-block pass of the two-pass backward
    (the launcher caches it).

    Args:
        q: (B, Hq, Nq, 128); k: (B, Hkv, Nk, 128). window, doc_id, doc_range, doc_pmin: as
        :func:`forward_plan`. scale: the softmax scale. lse_rs: the row stride of the lse2 /
        delta buffers the dQ pass (or the preprocessing) wrote. accum: add dK / dV to what the
        dk / dv tensors hold (``accumulate_into``) instead of writing them.
    Returns:
        a :class:`~.plans._Plan` on the grid (cdiv(Nk, 128), B·Hkv).

    Example:
        >>> # on an H200, after the dQ pass has written lse2 / delta (launch.backward does this):
        >>> # run_dkdv(dkdv_plan(q, k, win, None, None, 0, scale, lse2.shape[1]), q, k, v, do, dk, dv, lse2, delta)
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    half = BLOCK_N // 2
    static = dict(WIN=window, DOC_ID=doc_id if doc_id is not None else window,
                  DOC_RANGE=doc_range if doc_range is not None else window, Nq=Nq, Nk=Nk, Hq=Hq, Hkv=Hkv,
                  GROUP=Hq // Hkv, win_hs=1 if window.shape[0] > 1 else 0, doc_pmin=doc_pmin, lse_rs=lse_rs,
                  s_out=scale * _LOG2E, scale=scale, HAS_DOCS=doc_id is not None, STAGES=_BWD_STAGES[D],
                  PAIRS=BWD_PAIRS, ACCUM=bool(accum),
                  CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4)
    descs = tuple((n, n, rows, D, True) for n, rows in (("q_desc", 64), ("k_desc", half), ("v_desc", half),
                                                       ("do_desc", 64), ("dk_desc", half), ("dv_desc", half)))
    return _Plan(_attn_bwd_dkdv_hopper, (triton_cdiv(Nk, BLOCK_N), B * Hkv), static, BWD_CONFIG[D], "dkdv", descs,
                 gluon=True)


def run_dkdv(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, dk: torch.Tensor,
             dv: torch.Tensor, lse2: torch.Tensor, delta: torch.Tensor) -> None:
    """Launch a :func:`dkdv_plan` into dk, dv (B, Hkv, Nk, D), written in full.

    Args:
        q, dout: (B, Hq, Nq, D); k, v, dk, dv: (B, Hkv, Nk, D); TMA-compatible strides.
        lse2, delta: float32 (B·Hq, lse_rs): lse·log2(e) (+inf past Nq and for rows without a
            key) and rowsum(dO·O) (0 past Nq).
    """
    _run_plan(plan, dict(q_desc=q, k_desc=k, v_desc=v, do_desc=dout, dk_desc=dk, dv_desc=dv, Lse2=lse2,
                         Delta=delta), 0)
