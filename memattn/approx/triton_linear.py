"""Triton kernels for causal chunked linear attention, forward and backward.

Computes, for features pq = φ(q), pk = φ(k) (B, H, N, F) and values v (B, H, N, Dv):

    out_i = (Σ_{j<=i} (pq_i·pk_j) v_j) / (Σ_{j<=i} pq_i·pk_j + eps)

in chunks of BT rows (the derivation is in docs/approximate.md):
  * ``_linear_state_kernel`` sweeps the chunks of one (batch, head) and writes the state
    before each chunk, S_c = Σ_{chunks < c} pk_cᵀ v_c (F × Dv, accumulated in float32 and
    stored in the inputs' dtype, which every product rounds it to) and z_c = Σ pk; with
    REVERSE it writes R_c = Σ_{chunks > c} pq_cᵀ gn_c and r_c = Σ pq·gd (backward);
  * ``_linear_fwd_kernel``: per chunk, out = (pq S_c + tril(pq pkᵀ) v) / (pq·z_c + rowsum + eps);
  * ``_linear_bwd_dq_kernel``, ``_linear_bwd_dk_kernel``, ``_linear_bwd_dv_kernel``: the
    gradients w.r.t. pq, pk, v from gn = g/den and gd = −(g·out)/den, per chunk.
Chunk states take N/BT · F · Dv values per (batch, head) (2·N·D for BT = 64, F = Dv = 128):
memory O(N·D), never an (N, F, Dv) tensor. The feature map runs in PyTorch around the
kernels (autograd chains through it). Nothing is compiled at import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_key_mask, check_qkv
from .feature_maps import FeatureMap, resolve_feature_map
from .linear import eps_rows

__all__ = ["triton_causal_linear_attention", "causal_linear_features", "DEFAULT_BT", "LinearTiles", "tiles_for"]

DEFAULT_BT = 64


@dataclass(frozen=True)
class LinearTiles:
    """Launch shape of the kernels (chosen by :func:`tiles_for`; benchmarks may override).

    state_block: BK = BV of the chunk-state sweeps (one program per (BK, BV) tile of a
        (batch, head) walks all chunks, so smaller tiles give more programs when B·H is small).
    chunk_block: cap on the feature / value tile of the per-chunk kernels (forward, dq, dk,
        dv); each program recomputes its chunk's (BT, BT) score block, so one tile over the
        whole width computes it once.
    num_warps: warps of the per-chunk kernels.
    chunk_stages: software-pipelining depth of the per-chunk kernels (None: Triton's
        default). History (benchmarks/NOTES.md): in session 4 (states stored in float32,
        cast to bf16 before each product) the pipelined bf16 kernels were wrong on the H200
        under Triton 3.6 (output error 4-10x the same algorithm's rounding, gradients 0.14-0.38
        relative) and 1 became the default; since the states are stored in the inputs'
        dtype (no cast in the loops) the pipelined kernels give the same errors as the
        unpipelined ones to every printed digit, and forward+backward (with 64-wide state
        tiles) is 1.07-1.09x faster at N = 16k and 64k in two calls (session 5; at 4k the
        two calls disagreed), so None is the default again. 1 stays available.
    state_stages: the same for the state sweeps.
    fused_sweeps: run the backward's two state sweeps (the forward states' recomputation and
        the reverse sweep) as one launch of twice the programs, so that their serial chunk
        chains overlap when B·H is small (:func:`tiles_for` turns it on then).
    """

    state_block: int = 64
    chunk_block: int = 64
    num_warps: int = 4
    chunk_stages: int | None = None
    state_stages: int | None = None
    fused_sweeps: bool = False


# A benchmark's override of every field of the chosen tiles (None: tiles_for decides).
_OVERRIDE: list[LinearTiles | None] = [None]
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def tiles_for(bh: int, f: int, dv: int, device: torch.device) -> LinearTiles:
    """The launch shape for B·H = ``bh`` heads of features ``f`` and values ``dv``.

    64-wide state tiles and pipelined per-chunk kernels for every B·H; the backward's two
    state sweeps run as one launch (``fused_sweeps``) when one sweep's 64-wide tiles would
    give fewer programs than the GPU has multiprocessors, so that the two serial chunk
    chains overlap. Measured on the H200 (bf16, D = 128, forward+backward,
    benchmarks/NOTES.md session 5): this shape 1.07-1.08x faster than session 4's (32-wide
    states when few programs, unpipelined per-chunk kernels) at B·H = 16, and the fused sweeps
    a further 1.19-1.21x there; at B·H = 64 (4k) the fused sweeps were slower.

    Example:
        >>> tiles_for(64, 128, 128, torch.device("cpu")).fused_sweeps
        False
    """
    if _OVERRIDE[0] is not None:
        return _OVERRIDE[0]
    progs64 = bh * triton.cdiv(f, 64) * triton.cdiv(dv, 64)
    return LinearTiles(fused_sweeps=progs64 < _sm_count(device))


def _stages(n: int | None) -> dict:
    return {} if n is None else {"num_stages": n}


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _state_sweep(X, Y, W, Hs, Zs, i_k, i_v, i_bh,
                 s_xb, s_xh, s_xn, s_xd, s_yb, s_yh, s_yn, s_yd, s_wb, s_wh, s_wn,
                 H, N, F, DV, NC,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 REVERSE: tl.constexpr, HAS_W: tl.constexpr, PREC: tl.constexpr):
    # one (BK, BV) tile of the state of (batch, head) i_bh, swept over all chunks
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < F, offs_v < DV
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    zacc = tl.zeros([BK], dtype=tl.float32)
    hs_base = Hs + i_bh.to(tl.int64) * NC * F * DV
    zs_base = Zs + i_bh.to(tl.int64) * NC * F
    for it in range(0, NC):
        if REVERSE:
            c = NC - 1 - it
        else:
            c = it
        c64 = c.to(tl.int64)
        # state before this chunk (in sweep order)
        h_ptr = hs_base + c64 * F * DV + offs_k[:, None].to(tl.int64) * DV + offs_v[None, :]
        tl.store(h_ptr, acc.to(Hs.dtype.element_ty), mask=mk[:, None] & mv[None, :])
        if i_v == 0:
            tl.store(zs_base + c64 * F + offs_k, zacc, mask=mk)
        offs_t = c64 * BT + tl.arange(0, BT)
        mt = offs_t < N
        x = tl.load(X + b * s_xb + h * s_xh + offs_t[:, None] * s_xn + offs_k[None, :] * s_xd,
                    mask=mt[:, None] & mk[None, :], other=0.0)                          # [BT, BK]
        y = tl.load(Y + b * s_yb + h * s_yh + offs_t[:, None] * s_yn + offs_v[None, :] * s_yd,
                    mask=mt[:, None] & mv[None, :], other=0.0)                          # [BT, BV]
        acc += tl.dot(tl.trans(x), y, input_precision=PREC)                             # [BK, BT] @ [BT, BV]
        if HAS_W:
            w = tl.load(W + b * s_wb + h * s_wh + offs_t * s_wn, mask=mt, other=0.0)     # [BT]
            zacc += tl.sum(x.to(tl.float32) * w[:, None], axis=0)
        else:
            zacc += tl.sum(x.to(tl.float32), axis=0)


@triton.jit
def _linear_state_kernel(X, Y, W, Hs, Zs,
                         s_xb, s_xh, s_xn, s_xd, s_yb, s_yh, s_yn, s_yd, s_wb, s_wh, s_wn,
                         H, N, F, DV, NC,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         REVERSE: tl.constexpr, HAS_W: tl.constexpr, PREC: tl.constexpr):
    _state_sweep(X, Y, W, Hs, Zs, tl.program_id(0), tl.program_id(1), tl.program_id(2),
                 s_xb, s_xh, s_xn, s_xd, s_yb, s_yh, s_yn, s_yd, s_wb, s_wh, s_wn,
                 H, N, F, DV, NC, BT, BK, BV, REVERSE, HAS_W, PREC)


@triton.jit
def _linear_state2_kernel(X0, Y0, Hs0, Zs0, X1, Y1, W1, Hs1, Zs1,
                          s_x0b, s_x0h, s_x0n, s_x0d, s_y0b, s_y0h, s_y0n, s_y0d,
                          s_x1b, s_x1h, s_x1n, s_x1d, s_y1b, s_y1h, s_y1n, s_y1d, s_wb, s_wh, s_wn,
                          BH, H, N, F, DV, NC,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # the backward's two sweeps in one launch: programs of the third grid axis below B·H
    # recompute the forward states (Σ pkᵀ v), the others the reverse states (Σ pqᵀ gn, Σ pq·gd)
    i_z = tl.program_id(2)
    if i_z < BH:
        _state_sweep(X0, Y0, Zs0, Hs0, Zs0, tl.program_id(0), tl.program_id(1), i_z,
                     s_x0b, s_x0h, s_x0n, s_x0d, s_y0b, s_y0h, s_y0n, s_y0d, 0, 0, 0,
                     H, N, F, DV, NC, BT, BK, BV, False, False, PREC)
    else:
        _state_sweep(X1, Y1, W1, Hs1, Zs1, tl.program_id(0), tl.program_id(1), i_z - BH,
                     s_x1b, s_x1h, s_x1n, s_x1d, s_y1b, s_y1h, s_y1n, s_y1d, s_wb, s_wh, s_wn,
                     H, N, F, DV, NC, BT, BK, BV, True, True, PREC)


@triton.jit
def _linear_fwd_kernel(PQ, PK, V, Hs, Zs, O, DEN, EPS,
                       s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                       s_ob, s_oh, s_on, s_od,
                       H, N, F, DV, NC, eps,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                       ROW_EPS: tl.constexpr):
    i_c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    c64 = i_c.to(tl.int64)
    offs_t = c64 * BT + tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    mt, mv = offs_t < N, offs_v < DV
    o = tl.zeros([BT, BV], dtype=tl.float32)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    den = tl.zeros([BT], dtype=tl.float32)
    hs_base = Hs + (i_bh.to(tl.int64) * NC + c64) * F * DV
    zs_base = Zs + (i_bh.to(tl.int64) * NC + c64) * F
    for k0 in range(0, F, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < F
        pq = tl.load(PQ + b * s_qb + h * s_qh + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd,
                     mask=mt[:, None] & mk[None, :], other=0.0)                         # [BT, BK]
        pk = tl.load(PK + b * s_kb + h * s_kh + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd,
                     mask=mt[:, None] & mk[None, :], other=0.0)                         # [BT, BK]
        s = tl.load(hs_base + offs_k[:, None].to(tl.int64) * DV + offs_v[None, :],
                    mask=mk[:, None] & mv[None, :], other=0.0)                          # [BK, BV]
        z = tl.load(zs_base + offs_k, mask=mk, other=0.0)                               # [BK]
        o += tl.dot(pq, s.to(pq.dtype), input_precision=PREC)                           # [BT, BK] @ [BK, BV]
        a += tl.dot(pq, tl.trans(pk), input_precision=PREC)                             # [BT, BK] @ [BK, BT]
        den += tl.sum(pq.to(tl.float32) * z[None, :], axis=1)
    causal = offs_t[:, None] >= offs_t[None, :]
    a = tl.where(causal, a, 0.0)
    if ROW_EPS:   # eps in the units of shifted features, one per row (B·H, N)
        den += tl.sum(a, axis=1) + tl.load(EPS + i_bh.to(tl.int64) * N + offs_t, mask=mt, other=1.0)
    else:
        den += tl.sum(a, axis=1) + eps
    v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd,
                mask=mt[:, None] & mv[None, :], other=0.0)                              # [BT, BV]
    o += tl.dot(a.to(v.dtype), v, input_precision=PREC)                                 # [BT, BT] @ [BT, BV]
    o = o / den[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_t[:, None] * s_on + offs_v[None, :] * s_od,
             o.to(O.dtype.element_ty), mask=mt[:, None] & mv[None, :])
    if i_v == 0:
        tl.store(DEN + i_bh.to(tl.int64) * N + offs_t, den, mask=mt)


@triton.jit
def _linear_bwd_dq_kernel(GN, GD, V, PK, Hs, Zs, DPQ,
                          s_gb, s_gh, s_gn, s_gd, s_vb, s_vh, s_vn, s_vd, s_kb, s_kh, s_kn, s_kd,
                          s_ob, s_oh, s_on, s_od,
                          H, N, F, DV, NC,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # dpq_i = gn_i S_cᵀ + gd_i z_c + Σ_{j<=i in chunk} (gn_i·v_j + gd_i) pk_j
    i_c, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    c64 = i_c.to(tl.int64)
    offs_t = c64 * BT + tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    mt, mk = offs_t < N, offs_k < F
    hs_base = Hs + (i_bh.to(tl.int64) * NC + c64) * F * DV
    dpq = tl.zeros([BT, BK], dtype=tl.float32)
    m = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        gn = tl.load(GN + b * s_gb + h * s_gh + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd,
                     mask=mt[:, None] & mv[None, :], other=0.0)                         # [BT, BV]
        v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd,
                    mask=mt[:, None] & mv[None, :], other=0.0)                          # [BT, BV]
        s = tl.load(hs_base + offs_k[:, None].to(tl.int64) * DV + offs_v[None, :],
                    mask=mk[:, None] & mv[None, :], other=0.0)                          # [BK, BV]
        dpq += tl.dot(gn, tl.trans(s.to(gn.dtype)), input_precision=PREC)               # [BT, BV] @ [BV, BK]
        m += tl.dot(gn, tl.trans(v), input_precision=PREC)                              # [BT, BV] @ [BV, BT]
    gd = tl.load(GD + i_bh.to(tl.int64) * N + offs_t, mask=mt, other=0.0)              # [BT]
    m = tl.where(offs_t[:, None] >= offs_t[None, :], m + gd[:, None], 0.0)
    pk = tl.load(PK + b * s_kb + h * s_kh + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd,
                 mask=mt[:, None] & mk[None, :], other=0.0)                             # [BT, BK]
    dpq += tl.dot(m.to(pk.dtype), pk, input_precision=PREC)                             # [BT, BT] @ [BT, BK]
    z = tl.load(Zs + (i_bh.to(tl.int64) * NC + c64) * F + offs_k, mask=mk, other=0.0)
    dpq += gd[:, None] * z[None, :]
    tl.store(DPQ + b * s_ob + h * s_oh + offs_t[:, None] * s_on + offs_k[None, :] * s_od,
             dpq.to(DPQ.dtype.element_ty), mask=mt[:, None] & mk[None, :])


@triton.jit
def _linear_bwd_dk_kernel(GN, GD, V, PQ, Rs, Rz, DPK,
                          s_gb, s_gh, s_gn, s_gd, s_vb, s_vh, s_vn, s_vd, s_qb, s_qh, s_qn, s_qd,
                          s_ob, s_oh, s_on, s_od,
                          H, N, F, DV, NC,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # dpk_j = R_c v_j + r_c + Σ_{i>=j in chunk} (gn_i·v_j + gd_i) pq_i
    i_c, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    c64 = i_c.to(tl.int64)
    offs_t = c64 * BT + tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    mt, mk = offs_t < N, offs_k < F
    rs_base = Rs + (i_bh.to(tl.int64) * NC + c64) * F * DV
    dpk = tl.zeros([BT, BK], dtype=tl.float32)
    mt_ = tl.zeros([BT, BT], dtype=tl.float32)                                          # [j, i]
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        gn = tl.load(GN + b * s_gb + h * s_gh + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd,
                     mask=mt[:, None] & mv[None, :], other=0.0)                         # [BT, BV]
        v = tl.load(V + b * s_vb + h * s_vh + offs_t[:, None] * s_vn + offs_v[None, :] * s_vd,
                    mask=mt[:, None] & mv[None, :], other=0.0)                          # [BT, BV]
        r = tl.load(rs_base + offs_k[:, None].to(tl.int64) * DV + offs_v[None, :],
                    mask=mk[:, None] & mv[None, :], other=0.0)                          # [BK, BV]
        dpk += tl.dot(v, tl.trans(r.to(v.dtype)), input_precision=PREC)                 # [BT, BV] @ [BV, BK]
        mt_ += tl.dot(v, tl.trans(gn), input_precision=PREC)                            # [BT, BV] @ [BV, BT]
    gd = tl.load(GD + i_bh.to(tl.int64) * N + offs_t, mask=mt, other=0.0)
    mt_ = tl.where(offs_t[:, None] <= offs_t[None, :], mt_ + gd[None, :], 0.0)
    pq = tl.load(PQ + b * s_qb + h * s_qh + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd,
                 mask=mt[:, None] & mk[None, :], other=0.0)                             # [BT, BK]
    dpk += tl.dot(mt_.to(pq.dtype), pq, input_precision=PREC)                           # [BT, BT] @ [BT, BK]
    rz = tl.load(Rz + (i_bh.to(tl.int64) * NC + c64) * F + offs_k, mask=mk, other=0.0)
    dpk += rz[None, :]
    dpk = tl.where(mt[:, None], dpk, 0.0)
    tl.store(DPK + b * s_ob + h * s_oh + offs_t[:, None] * s_on + offs_k[None, :] * s_od,
             dpk.to(DPK.dtype.element_ty), mask=mt[:, None] & mk[None, :])


@triton.jit
def _linear_bwd_dv_kernel(GN, PQ, PK, Rs, DV_,
                          s_gb, s_gh, s_gn, s_gd, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
                          s_ob, s_oh, s_on, s_od,
                          H, N, F, DV, NC,
                          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    # dv_j = pk_j R_c + Σ_{i>=j in chunk} (pq_i·pk_j) gn_i
    i_c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    c64 = i_c.to(tl.int64)
    offs_t = c64 * BT + tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    mt, mv = offs_t < N, offs_v < DV
    rs_base = Rs + (i_bh.to(tl.int64) * NC + c64) * F * DV
    dv = tl.zeros([BT, BV], dtype=tl.float32)
    at = tl.zeros([BT, BT], dtype=tl.float32)                                           # [j, i]
    for k0 in range(0, F, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < F
        pq = tl.load(PQ + b * s_qb + h * s_qh + offs_t[:, None] * s_qn + offs_k[None, :] * s_qd,
                     mask=mt[:, None] & mk[None, :], other=0.0)                         # [BT, BK]
        pk = tl.load(PK + b * s_kb + h * s_kh + offs_t[:, None] * s_kn + offs_k[None, :] * s_kd,
                     mask=mt[:, None] & mk[None, :], other=0.0)                         # [BT, BK]
        r = tl.load(rs_base + offs_k[:, None].to(tl.int64) * DV + offs_v[None, :],
                    mask=mk[:, None] & mv[None, :], other=0.0)                          # [BK, BV]
        dv += tl.dot(pk, r.to(pk.dtype), input_precision=PREC)                          # [BT, BK] @ [BK, BV]
        at += tl.dot(pk, tl.trans(pq), input_precision=PREC)                            # [BT, BK] @ [BK, BT]
    at = tl.where(offs_t[:, None] <= offs_t[None, :], at, 0.0)
    gn = tl.load(GN + b * s_gb + h * s_gh + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd,
                 mask=mt[:, None] & mv[None, :], other=0.0)                             # [BT, BV]
    dv += tl.dot(at.to(gn.dtype), gn, input_precision=PREC)                             # [BT, BT] @ [BT, BV]
    tl.store(DV_ + b * s_ob + h * s_oh + offs_t[:, None] * s_on + offs_v[None, :] * s_od,
             dv.to(DV_.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def _linear_bwd_prep_kernel(G, O, DEN, GN, GD,
                            s_gb, s_gh, s_gn, s_gd, s_ob, s_oh, s_on, s_od,
                            H, N, DV,
                            BT: tl.constexpr, BDV: tl.constexpr):
    # gn = g / den (in v's dtype), gd = -(g·out) / den (float32): one pass over g and out,
    # BDV value columns at a time
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    offs_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    mt = offs_t < N
    den = tl.load(DEN + i_bh.to(tl.int64) * N + offs_t, mask=mt, other=1.0)
    row = i_bh.to(tl.int64) * N + offs_t
    go = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, DV, BDV):
        offs_v = v0 + tl.arange(0, BDV)
        m2 = mt[:, None] & (offs_v < DV)[None, :]
        g = tl.load(G + b * s_gb + h * s_gh + offs_t[:, None] * s_gn + offs_v[None, :] * s_gd,
                    mask=m2, other=0.0).to(tl.float32)                                  # [BT, BDV]
        o = tl.load(O + b * s_ob + h * s_oh + offs_t[:, None] * s_on + offs_v[None, :] * s_od,
                    mask=m2, other=0.0).to(tl.float32)
        tl.store(GN + row[:, None] * DV + offs_v[None, :], (g / den[:, None]).to(GN.dtype.element_ty), mask=m2)
        go += tl.sum(g * o, axis=1)
    tl.store(GD + row, -go / den, mask=mt)


# ----------------------------------------------------------------------------- launchers
def _blocks(f: int, dv: int, cap: int) -> tuple[int, int]:
    bk = min(cap, max(16, triton.next_power_of_2(f)))
    bv = min(cap, max(16, triton.next_power_of_2(dv)))
    return bk, bv


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs: exact float32 products (no TF32) so results match the PyTorch path.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, bt: int) -> None:
    if pq.dim() != 4 or pk.shape != pq.shape or v.dim() != 4 or v.shape[:3] != pq.shape[:3]:
        raise ValueError(f"expected pq, pk (B, H, N, F) and v (B, H, N, Dv), got {tuple(pq.shape)}, "
                         f"{tuple(pk.shape)}, {tuple(v.shape)}")
    if pq.dtype not in (torch.float16, torch.bfloat16, torch.float32) or pk.dtype != pq.dtype or v.dtype != pq.dtype:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, one dtype; got {pq.dtype}, "
                        f"{pk.dtype}, {v.dtype}")
    if not (pq.device == pk.device == v.device):
        raise ValueError("pq, pk and v must be on one device")
    if bt < 16 or bt & (bt - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Triton kernels, got {bt}")


def _states(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, bt: int, reverse: bool, t: LinearTiles):
    """Per-chunk states of Σ xᵀ y, (B·H, NC, F, Dv) in x's dtype, and of Σ x·w, (B·H, NC, F)
    float32. The sums accumulate in float32; every kernel rounds the state to the inputs'
    dtype before its product, so storing it rounded gives the same results with half the
    state traffic and memory for 16-bit inputs (float32 inputs keep float32 states)."""
    B, H, N, F = x.shape
    DV = y.shape[3]
    NC = triton.cdiv(N, bt)
    bk, bv = _blocks(F, DV, t.state_block)
    hs = torch.empty(B * H, NC, F, DV, dtype=x.dtype, device=x.device)
    zs = torch.empty(B * H, NC, F, dtype=torch.float32, device=x.device)
    wt = w if w is not None else zs  # placeholder pointer when HAS_W is False
    sw = w.stride() if w is not None else (0, 0, 0)
    grid = (triton.cdiv(F, bk), triton.cdiv(DV, bv), B * H)
    _linear_state_kernel[grid](x, y, wt, hs, zs, *x.stride(), *y.stride(), *sw, H, N, F, DV, NC,
                               BT=bt, BK=bk, BV=bv, REVERSE=reverse, HAS_W=w is not None, PREC=_prec(x.dtype),
                               **_stages(t.state_stages))
    return hs, zs


def _states_pair(x0: torch.Tensor, y0: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor, w1: torch.Tensor,
                 bt: int, t: LinearTiles):
    """:func:`_states` of (x0, y0) forward and of (x1, y1, w1) in reverse, in one launch."""
    B, H, N, F = x0.shape
    DV = y0.shape[3]
    NC = triton.cdiv(N, bt)
    bk, bv = _blocks(F, DV, t.state_block)
    out = []
    for x in (x0, x1):
        out.append((torch.empty(B * H, NC, F, DV, dtype=x.dtype, device=x.device),
                    torch.empty(B * H, NC, F, dtype=torch.float32, device=x.device)))
    (hs0, zs0), (hs1, zs1) = out
    grid = (triton.cdiv(F, bk), triton.cdiv(DV, bv), 2 * B * H)
    _linear_state2_kernel[grid](x0, y0, hs0, zs0, x1, y1, w1, hs1, zs1, *x0.stride(), *y0.stride(),
                                *x1.stride(), *y1.stride(), *w1.stride(), B * H, H, N, F, DV, NC,
                                BT=bt, BK=bk, BV=bv, PREC=_prec(x0.dtype), **_stages(t.state_stages))
    return out[0], out[1]


def _forward(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, eps: float | torch.Tensor, bt: int):
    _check(pq, pk, v, bt)
    B, H, N, F = pq.shape
    DV = v.shape[3]
    NC = triton.cdiv(N, bt)
    t = tiles_for(B * H, F, DV, pq.device)
    bk, bv = _blocks(F, DV, t.chunk_block)
    hs, zs = _states(pk, v, None, bt, False, t)
    out = torch.empty_like(v)
    den = torch.empty(B, H, N, dtype=torch.float32, device=v.device)
    grid = (NC, triton.cdiv(DV, bv), B * H)
    row_eps = isinstance(eps, torch.Tensor)
    eps_t = eps.float().contiguous() if row_eps else den          # placeholder pointer when scalar
    _linear_fwd_kernel[grid](pq, pk, v, hs, zs, out, den, eps_t, *pq.stride(), *pk.stride(), *v.stride(),
                             *out.stride(), H, N, F, DV, NC, 0.0 if row_eps else float(eps),
                             BT=bt, BK=bk, BV=bv, PREC=_prec(pq.dtype), ROW_EPS=row_eps,
                             num_warps=t.num_warps, **_stages(t.chunk_stages))
    return out, den


def _backward(pq, pk, v, out, den, grad_out, bt: int):
    B, H, N, F = pq.shape
    DV = v.shape[3]
    NC = triton.cdiv(N, bt)
    t = tiles_for(B * H, F, DV, pq.device)
    bk, bv = _blocks(F, DV, t.chunk_block)
    gn = torch.empty(B, H, N, DV, dtype=v.dtype, device=v.device)      # d out / d num
    gd = torch.empty(B, H, N, dtype=torch.float32, device=v.device)    # d out / d den
    _linear_bwd_prep_kernel[(triton.cdiv(N, 64), B * H)](
        grad_out, out, den, gn, gd, *grad_out.stride(), *out.stride(), H, N, DV,
        BT=64, BDV=min(128, max(16, triton.next_power_of_2(DV))))
    if t.fused_sweeps:
        (hs, zs), (rs, rz) = _states_pair(pk, v, pq, gn, gd, bt, t)
    else:
        hs, zs = _states(pk, v, None, bt, False, t)
        rs, rz = _states(pq, gn, gd, bt, True, t)
    prec = _prec(pq.dtype)
    run = {"num_warps": t.num_warps, **_stages(t.chunk_stages)}
    dpq, dpk, dv = torch.empty_like(pq), torch.empty_like(pk), torch.empty_like(v)
    _linear_bwd_dq_kernel[(NC, triton.cdiv(F, bk), B * H)](
        gn, gd, v, pk, hs, zs, dpq, *gn.stride(), *v.stride(), *pk.stride(), *dpq.stride(),
        H, N, F, DV, NC, BT=bt, BK=bk, BV=bv, PREC=prec, **run)
    _linear_bwd_dk_kernel[(NC, triton.cdiv(F, bk), B * H)](
        gn, gd, v, pq, rs, rz, dpk, *gn.stride(), *v.stride(), *pq.stride(), *dpk.stride(),
        H, N, F, DV, NC, BT=bt, BK=bk, BV=bv, PREC=prec, **run)
    _linear_bwd_dv_kernel[(NC, triton.cdiv(DV, bv), B * H)](
        gn, pq, pk, rs, dv, *gn.stride(), *pq.stride(), *pk.stride(), *dv.stride(),
        H, N, F, DV, NC, BT=bt, BK=bk, BV=bv, PREC=prec, **run)
    return dpq, dpk, dv


class _TritonCausalLinear(torch.autograd.Function):
    """eps: a float, or a detached float32 (B, H, N) tensor of per-row values."""

    @staticmethod
    def forward(ctx, pq, pk, v, eps, bt: int):
        out, den = _forward(pq, pk, v, eps, bt)
        ctx.save_for_backward(pq, pk, v, out, den)
        ctx.bt = bt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pq, pk, v, out, den = ctx.saved_tensors
        dpq, dpk, dv = _backward(pq, pk, v, out, den, grad_out, ctx.bt)
        return dpq, dpk, dv, None, None


def causal_linear_features(pq: torch.Tensor, pk: torch.Tensor, v: torch.Tensor, *,
                           eps: float | torch.Tensor = 1e-6, chunk_size: int = DEFAULT_BT) -> torch.Tensor:
    """Causal normalised linear attention on given features, by the Triton kernels.

    ``out_i = Σ_{j<=i} (pq_i·pk_j) v_j / (Σ_{j<=i} pq_i·pk_j + eps)``; differentiable in
    pq, pk and v.

    Args:
        pq, pk: (B, H, N, F) non-negative features (any strides); v: (B, H, N, Dv).
            float16, bfloat16 or float32; the same device (CUDA, or CPU under TRITON_INTERPRET=1).
        eps: denominator guard: a float, or per row a (B, H, N) tensor (no gradient).
        chunk_size: rows per chunk, a power of two >= 16.
    Returns:
        (B, H, N, Dv) in v's dtype.

    Example:
        >>> pq, pk, v = (torch.rand(1, 2, 256, 64, device="cuda") for _ in range(3))  # doctest: +SKIP
        >>> causal_linear_features(pq, pk, v).shape                                   # doctest: +SKIP
        torch.Size([1, 2, 256, 64])
    """
    _check(pq, pk, v, chunk_size)
    if isinstance(eps, torch.Tensor):
        if eps.shape != pq.shape[:3]:
            raise ValueError(f"a per-row eps must have shape (B, H, N) = {tuple(pq.shape[:3])}, got {tuple(eps.shape)}")
        eps = eps.detach()
    else:
        eps = float(eps)
    return _TritonCausalLinear.apply(pq, pk, v, eps, int(chunk_size))


def triton_causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                   feature_map: str | FeatureMap = "elu", eps: float = 1e-6,
                                   key_padding_mask: torch.Tensor | None = None,
                                   chunk_size: int | None = None) -> torch.Tensor:
    """Causal linear attention with the feature map in PyTorch and the Triton kernels.

    Args:
        q: (B, Hq, N, D); k: (B, Hkv, N, D); v: (B, Hkv, N, Dv) (GQA: k, v features are
            repeated to Hq heads). feature_map, eps, key_padding_mask: as in
            :func:`memattn.approx.linear_attention`. chunk_size: default 64.
    Returns:
        (B, Hq, N, Dv) in q's dtype.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 256, 64, device="cuda") for _ in range(3))  # doctest: +SKIP
        >>> triton_causal_linear_attention(q, k, v).shape                             # doctest: +SKIP
        torch.Size([1, 2, 256, 64])
    """
    check_qkv(q, k, v, same_length=True)
    if q.dtype == torch.float64:
        raise TypeError("the Triton kernels take float16, bfloat16 or float32; use backend='pytorch' for float64")
    fmap = resolve_feature_map(feature_map)
    km = check_key_mask(key_padding_mask, k)
    mask = None if km is None else km[:, None, :, None]
    qf, kf = q.float(), k.float()
    shift = fmap.key_shift(kf, None if mask is None else mask[..., 0])
    pq, sq = fmap.scaled(qf, is_query=True)
    pk = fmap(kf, is_query=False, key_shift=shift)
    if mask is not None:
        pk = pk * mask
    g = q.shape[1] // k.shape[1]
    vv = v
    if g > 1:
        pk, vv = pk.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        shift = None if shift is None else shift.repeat_interleave(g, 1)
    e = eps_rows(eps, sq, shift)
    out = causal_linear_features(pq.to(q.dtype), pk.to(q.dtype), vv, eps=e, chunk_size=chunk_size or DEFAULT_BT)
    return out
