"""Experiment (session 14): a Hopper forward written in Gluon, with the overlap Triton 3.6 will not emit.

Sessions 10-13 read the remaining gap to FlexAttention / cuDNN as "energy per product at the
power cap, and Hopper features Triton 3.6 does not give on sm_90": wgmma kept in flight across
the softmax (FA3's intra-warpgroup overlap) and explicit control of the TMA pipeline. Triton 3.6
ships Gluon (`triton.experimental.gluon`), which exposes both: `warpgroup_mma(..., is_async=True)`
with `warpgroup_mma_wait(num_outstanding=...)`, mbarriers and TMA copies. This file tests that
reading on the forward, before anything enters the package.

Scope: B, H, N, D contiguous (a [B*H*N, D] view per tensor for the TMA descriptors), bfloat16 or
float16, D in {64, 128}, N a multiple of 128, GQA, masks: none, causal (top-left, Nq == Nk) and a
causal sliding window (key j seen by query i when i - W <= j <= i, memattn's `sliding_window(W)`).

Per program: one query tile of BLOCK_M rows (num_warps // 4 warpgroups, 16 rows per warp). Key
tiles stream through a ring of STAGES K and V buffers filled by TMA. Iteration t issues
S_t = Q K_t^T, then O += P_{t-1} V_{t-1}, waits for S_t only (the PV product stays in flight
across the softmax of S_t), then waits for the PV product and rescales O. A K slot is refilled as
soon as its QK^T product has completed, a V slot as soon as its PV product has.

Run on the GPU: `PYTHONPATH=$PWD python benchmarks/experiments/gluon_fwd.py --out $OUT/x.json`.
Offline (no GPU): `python benchmarks/experiments/gluon_fwd.py --compile-only` builds the sm_90
kernels with Triton's bundled ptxas and prints their register and shared-memory use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634


@gluon.jit
def _softmax_step(s, m_i, kstart, m0, qk_scale, window,
                  MASKED: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """One tile's online-softmax step: the new row maxima (log2 units), P, and the rescale factor."""
    if MASKED:
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        cols = kstart + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        r2 = gl.expand_dims(rows, 1)
        c2 = gl.expand_dims(cols, 0)
        keep = c2 >= 0
        if CAUSAL:
            keep = keep & (c2 <= r2)
        if HAS_WINDOW:
            keep = keep & (c2 >= r2 - window)
        s = gl.where(keep, s, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    if MASKED:
        m_use = gl.where(m_new == -float("inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    return m_new, p, alpha


@gluon.jit
def _tile_needs_mask(kstart, m0, window, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    need = kstart < 0
    if CAUSAL:
        need = need | (kstart + BLOCK_N - 1 > m0)
    if HAS_WINDOW:
        need = need | (kstart < m0 + BLOCK_M - 1 - window)
    return need


@gluon.jit
def gluon_fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr,
                     N, H, HKV, qk_scale, window,
                     CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, STAGES: gl.constexpr,
                     num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m                 # longest rows first
    b = bh // H
    h = bh % H
    hk = b * HKV + h // (H // HKV)
    m0 = pid_m * BLOCK_M
    q_row = bh * N + m0
    kv_row = hk * N

    hi = N
    if CAUSAL:
        hi = gl.minimum(N, m0 + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = gl.maximum(0, m0 - window) // BLOCK_N * BLOCK_N
    n_tiles = gl.cdiv(hi - lo, BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    kv_bytes: gl.constexpr = BLOCK_N * HEAD_D * dtype.primitive_bitwidth // 8
    mbarrier.expect(q_bar, BLOCK_M * HEAD_D * dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        live = i < n_tiles
        mbarrier.expect(k_bars.index(i), kv_bytes, pred=live)
        tma.async_copy_global_to_shared(k_desc, [kv_row + lo + i * BLOCK_N, 0], k_bars.index(i),
                                        k_smem.index(i), pred=live)
        mbarrier.expect(v_bars.index(i), kv_bytes, pred=live)
        tma.async_copy_global_to_shared(v_desc, [kv_row + lo + i * BLOCK_N, 0], v_bars.index(i),
                                        v_smem.index(i), pred=live)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)

    # tile 0: its product alone, then its softmax
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, q_smem, k_smem.index(0)))[0]
    refill = STAGES < n_tiles
    mbarrier.expect(k_bars.index(0), kv_bytes, pred=refill)
    tma.async_copy_global_to_shared(k_desc, [kv_row + lo + STAGES * BLOCK_N, 0], k_bars.index(0),
                                    k_smem.index(0), pred=refill)
    if _tile_needs_mask(lo, m0, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N):
        m_i, p, alpha = _softmax_step(s, m_i, lo, m0, qk_scale, window, True, CAUSAL, HAS_WINDOW,
                                      BLOCK_M, BLOCK_N, s_layout)
    else:
        m_i, p, alpha = _softmax_step(s, m_i, lo, m0, qk_scale, window, False, CAUSAL, HAS_WINDOW,
                                      BLOCK_M, BLOCK_N, s_layout)
    l_i = gl.sum(p, axis=1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    for t in range(1, n_tiles):
        kstart = lo + t * BLOCK_N
        slot = t % STAGES
        prev = (t - 1) % STAGES
        mbarrier.wait(k_bars.index(slot), (t // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_bars.index(prev), ((t - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, k_smem.index(slot)))[0]
        refill = t + STAGES < n_tiles
        mbarrier.expect(k_bars.index(slot), kv_bytes, pred=refill)
        tma.async_copy_global_to_shared(k_desc, [kv_row + kstart + STAGES * BLOCK_N, 0], k_bars.index(slot),
                                        k_smem.index(slot), pred=refill)
        if _tile_needs_mask(kstart, m0, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N):
            m_i, p, alpha = _softmax_step(s, m_i, kstart, m0, qk_scale, window, True, CAUSAL, HAS_WINDOW,
                                          BLOCK_M, BLOCK_N, s_layout)
        else:
            m_i, p, alpha = _softmax_step(s, m_i, kstart, m0, qk_scale, window, False, CAUSAL, HAS_WINDOW,
                                          BLOCK_M, BLOCK_N, s_layout)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = warpgroup_mma_wait(0, deps=(acc, p_op, v_smem.index(prev)))[0]
        refill = t - 1 + STAGES < n_tiles
        mbarrier.expect(v_bars.index(prev), kv_bytes, pred=refill)
        tma.async_copy_global_to_shared(v_desc, [kv_row + kstart + (STAGES - 1) * BLOCK_N, 0],
                                        v_bars.index(prev), v_smem.index(prev), pred=refill)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_bars.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, p_op, v_smem.index(last)))[0]

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.expand_dims(l_o, 1)
    q_smem.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    # lse in natural-log units, [B, H, N] float32
    lse = (m_i + gl.log2(l_i)) / 1.4426950408889634
    rows = gl.arange(0, BLOCK_M, layout=row_s)
    gl.store(lse_ptr + bh * N + m0 + rows, lse)
    tma.store_wait(pendings=0)


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                 q_row, kv_row, lo, n_tiles, STAGES: gl.constexpr):
    """Worker partition (one warp): every TMA load of the program. A slot is reused once the
    consumer has arrived on its `empty` barrier (the first round passes: parity starts at 1)."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for t in range(n_tiles):
        slot = t % STAGES
        ph = ((t // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(slot), ph)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + lo + t * BLOCK_N, 0], k_ready.index(slot),
                                        k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), ph)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + lo + t * BLOCK_N, 0], v_ready.index(slot),
                                        v_smem.index(slot))


@gluon.jit
def _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                 lo, n_tiles, m0, qk_scale, window,
                 CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, STAGES: gl.constexpr,
                 s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Default partition: the products and the softmax; returns (acc, m, l) of the query tile."""
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    HEAD_D: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_s)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, q_smem, k_smem.index(0)))[0]
    mbarrier.arrive(k_empty.index(0))
    if _tile_needs_mask(lo, m0, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N):
        m_i, p, alpha = _softmax_step(s, m_i, lo, m0, qk_scale, window, True, CAUSAL, HAS_WINDOW,
                                      BLOCK_M, BLOCK_N, s_layout)
    else:
        m_i, p, alpha = _softmax_step(s, m_i, lo, m0, qk_scale, window, False, CAUSAL, HAS_WINDOW,
                                      BLOCK_M, BLOCK_N, s_layout)
    l_i = gl.sum(p, axis=1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    for t in range(1, n_tiles):
        kstart = lo + t * BLOCK_N
        slot = t % STAGES
        prev = (t - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((t - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, k_smem.index(slot)))[0]
        mbarrier.arrive(k_empty.index(slot))
        if _tile_needs_mask(kstart, m0, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N):
            m_i, p, alpha = _softmax_step(s, m_i, kstart, m0, qk_scale, window, True, CAUSAL, HAS_WINDOW,
                                          BLOCK_M, BLOCK_N, s_layout)
        else:
            m_i, p, alpha = _softmax_step(s, m_i, kstart, m0, qk_scale, window, False, CAUSAL, HAS_WINDOW,
                                          BLOCK_M, BLOCK_N, s_layout)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = warpgroup_mma_wait(0, deps=(acc, p_op, v_smem.index(prev)))[0]
        mbarrier.arrive(v_empty.index(prev))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, p_op, v_smem.index(last)))[0]
    return acc, m_i, l_i


@gluon.jit
def gluon_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr,
                        N, H, HKV, qk_scale, window,
                        CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, STAGES: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """The same forward, warp-specialised: one producer warp issues the TMA loads, so the
    consumer warps run no CTA-wide barrier inside the loop (the single-partition kernel above
    has four per key tile, around each TMA issue)."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    b = bh // H
    h = bh % H
    hk = b * HKV + h // (H // HKV)
    m0 = pid_m * BLOCK_M
    q_row = bh * N + m0
    kv_row = hk * N
    hi = N
    if CAUSAL:
        hi = gl.minimum(N, m0 + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = gl.maximum(0, m0 - window) // BLOCK_N * BLOCK_N
    n_tiles = gl.cdiv(hi - lo, BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)

    acc, m_i, l_i = gl.warp_specialize(
        [(_ws_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                         lo, n_tiles, m0, qk_scale, window, CAUSAL, HAS_WINDOW, STAGES, s_layout, o_layout)),
         (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                         v_empty, q_row, kv_row, lo, n_tiles, STAGES))],
        [1], [PRODUCER_REGS])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(k_empty.index(i))
        mbarrier.invalidate(v_empty.index(i))
    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.expand_dims(l_o, 1)
    q_smem.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    lse = (m_i + gl.log2(l_i)) / 1.4426950408889634
    rows = gl.arange(0, BLOCK_M, layout=row_s)
    gl.store(lse_ptr + bh * N + m0 + rows, lse)
    tma.store_wait(pendings=0)


@gluon.jit
def _pp_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                 q_row, kv_row, lo, n_tiles, STAGES: gl.constexpr):
    """Producer warp of the two-consumer kernel: both 64-row Q halves, then K / V per slot."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + HALF, 0], q_bar, q_smem.index(1))
    for t in range(n_tiles):
        slot = t % STAGES
        ph = ((t // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(slot), ph)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + lo + t * BLOCK_N, 0], k_ready.index(slot),
                                        k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), ph)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + lo + t * BLOCK_N, 0], v_ready.index(slot),
                                        v_smem.index(slot))


@gluon.jit
def _pp_consumer(o_desc, lse_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                 lo, n_tiles, m0, q_row, lse_off, qk_scale, window,
                 HALF_ID: gl.constexpr, CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr,
                 STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """One consumer warpgroup: 64 query rows against every key tile, then their O and lse."""
    qh = q_smem.index(HALF_ID)
    BLOCK_M: gl.constexpr = qh.shape[0]
    HEAD_D: gl.constexpr = qh.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = qh.dtype
    r0 = m0 + HALF_ID * BLOCK_M
    acc, m_i, l_i = _ws_consumer(qh, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                                 lo, n_tiles, r0, qk_scale, window, CAUSAL, HAS_WINDOW, STAGES, s_layout, o_layout)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.expand_dims(l_o, 1)
    qh.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row + HALF_ID * BLOCK_M, 0], qh)
    lse = (m_i + gl.log2(l_i)) / 1.4426950408889634
    rows = gl.arange(0, BLOCK_M, layout=row_s)
    gl.store(lse_ptr + lse_off + HALF_ID * BLOCK_M + rows, lse)
    tma.store_wait(pendings=0)


@gluon.jit
def gluon_fwd_pp_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr,
                        N, H, HKV, qk_scale, window,
                        CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, STAGES: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Two consumer warpgroups in separate partitions (64 query rows each, 128 per program) and
    a producer warp. No barrier joins the two warpgroups inside the loop, so one can run its
    products while the other runs its softmax (FA3's ping-pong, here left to the warp
    schedulers). K / V slots are freed when both consumers have arrived (count 2)."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = 2 * HALF
    dtype: gl.constexpr = q_desc.dtype
    gl.static_assert(num_warps == 4, "one warpgroup per consumer partition")
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    b = bh // H
    h = bh % H
    hk = b * HKV + h // (H // HKV)
    m0 = pid_m * BLOCK_M
    q_row = bh * N + m0
    kv_row = hk * N
    hi = N
    if CAUSAL:
        hi = gl.minimum(N, m0 + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = gl.maximum(0, m0 - window) // BLOCK_N * BLOCK_N
    n_tiles = gl.cdiv(hi - lo, BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
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

    lse_off = bh * N + m0
    gl.warp_specialize(
        [(_pp_consumer, (o_desc, lse_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                         lo, n_tiles, m0, q_row, lse_off, qk_scale, window, 0, CAUSAL, HAS_WINDOW, STAGES,
                         s_layout, o_layout)),
         (_pp_consumer, (o_desc, lse_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                         lo, n_tiles, m0, q_row, lse_off, qk_scale, window, 1, CAUSAL, HAS_WINDOW, STAGES,
                         s_layout, o_layout)),
         (_pp_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                         v_empty, q_row, kv_row, lo, n_tiles, STAGES))],
        [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  window: int | None = None, block_m: int = 128, block_n: int = 128, stages: int = 2,
                  num_warps: int = 8, poison: bool = False,
                  ws: bool = False, producer_regs: int = 24, pp: bool = False, consumer_regs: int = 240) -> tuple[torch.Tensor, torch.Tensor]:
    """Gluon Hopper forward. q [B, H, N, D], k / v [B, HKV, N, D] -> (out [B, H, N, D], lse [B, H, N] fp32)."""
    B, H, N, D = q.shape
    HKV = k.shape[1]
    if window is not None and not causal:
        raise ValueError("window: this experiment covers the causal sliding window only")
    if N % block_m or N % block_n:
        raise ValueError(f"N={N}: this experiment needs N divisible by the tiles")
    if block_m != 16 * num_warps and not pp:
        raise ValueError("block_m must be 16 * num_warps (one 16-row slab per warp)")
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    if poison:                                   # an element the kernel does not write fails the check
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    lay_q = gl.NVMMASharedLayout.get_default_for([block_m, D], gdt)
    lay_k = gl.NVMMASharedLayout.get_default_for([block_n, D], gdt)
    q2, k2, v2, o2 = (t.view(-1, D) for t in (q, k, v, out))
    qd = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [block_m, D], lay_q)
    kd = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_n, D], lay_k)
    vd = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [block_n, D], lay_k)
    od = TensorDescriptor(o2, list(o2.shape), list(o2.stride()), [block_m, D], lay_q)
    scale = 1.0 / math.sqrt(D)
    grid = (N // block_m, B * H)
    if pp:
        half = block_m // 2
        lay_h = gl.NVMMASharedLayout.get_default_for([half, D], gdt)
        qd = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [half, D], lay_h)
        od = TensorDescriptor(o2, list(o2.shape), list(o2.stride()), [half, D], lay_h)
        gluon_fwd_pp_kernel[grid](qd, kd, vd, od, lse, N, H, HKV, scale * LOG2E, window or 0,
                                  CAUSAL=causal, HAS_WINDOW=window is not None, STAGES=stages,
                                  PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs, num_warps=4)
    elif ws:
        gluon_fwd_ws_kernel[grid](qd, kd, vd, od, lse, N, H, HKV, scale * LOG2E, window or 0,
                                  CAUSAL=causal, HAS_WINDOW=window is not None, STAGES=stages,
                                  PRODUCER_REGS=producer_regs, num_warps=num_warps)
    else:
        gluon_fwd_kernel[grid](qd, kd, vd, od, lse, N, H, HKV, scale * LOG2E, window or 0,
                               CAUSAL=causal, HAS_WINDOW=window is not None, STAGES=stages, num_warps=num_warps)
    return out, lse


def reference(q, k, v, causal, window):
    B, H, N, D = q.shape
    rep = H // k.shape[1]
    kf = k.float().repeat_interleave(rep, 1)
    vf = v.float().repeat_interleave(rep, 1)
    s = q.float() @ kf.transpose(-1, -2) / math.sqrt(D)
    i = torch.arange(N, device=q.device)[:, None]
    j = torch.arange(N, device=q.device)[None, :]
    keep = torch.ones(N, N, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j >= i - window
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ vf, torch.logsumexp(s, -1)


def _compile_only() -> None:
    """Build the sm_90 variants on a machine without a GPU and print registers / spills / smem."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _Target:
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(_Target())
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(bindir, "ptxas")
    out_dir = Path(os.environ["GLUON_PTX_DIR"]) if os.environ.get("GLUON_PTX_DIR") else None
    for ws, D, stages, causal, window in [("pp", 128, 2, False, None), ("pp", 128, 2, True, 1024),
                                          ("pp", 64, 3, True, None), (True, 128, 2, False, None)]:
        q = torch.empty(1, 2, 256, D, dtype=torch.bfloat16)
        gdt = gl.bfloat16
        lay = gl.NVMMASharedLayout.get_default_for([128, D], gdt)
        q2 = q.view(-1, D)
        d = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [128, D], lay)
        lse = torch.empty(1, 2, 256)
        kern = gluon_fwd_pp_kernel if ws == "pp" else gluon_fwd_ws_kernel if ws else gluon_fwd_kernel
        extra = {"PRODUCER_REGS": 24} if ws else {}
        if ws == "pp":
            extra["CONSUMER_REGS"] = 240
            lay = gl.NVMMASharedLayout.get_default_for([64, D], gdt)
            dq = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [64, D], lay)
        else:
            dq = d
        ck = kern.warmup(dq, d, d, dq, lse, 256, 2, 2, 0.1, window or 0, CAUSAL=causal,
                         HAS_WINDOW=window is not None, STAGES=stages, num_warps=4 if ws == "pp" else 8,
                         grid=(2, 2), **extra)
        ptx = ck.asm["ptx"]
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", "-", "-o", "/dev/null"], input=ptx,
                           capture_output=True, text=True)
        regs = re.search(r"Used (\d+) registers", r.stderr)
        spill = re.search(r"(\d+) bytes spill stores", r.stderr)
        print(f"ws={ws} D={D} stages={stages} causal={causal} window={window}: regs={regs and regs.group(1)} "
              f"spill={spill and spill.group(1)} smem={ck.metadata.shared} "
              f"wgmma={ptx.count('wgmma.mma_async')} "
              f"waits={[ln.strip() for ln in ptx.splitlines() if 'wgmma.wait_group' in ln]}", flush=True)
        if out_dir:
            (out_dir / f"gluon_fwd_ws{ws}_d{D}_s{stages}_c{int(causal)}_w{window}.ptx").write_text(ptx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.compile_only:
        _compile_only()
        return
    raise SystemExit("the GPU run lives in scripts/gpu_gluon.py")


if __name__ == "__main__":
    sys.exit(main())
