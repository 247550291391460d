"""Backward kernels (FlashAttention-2 recomputation from the saved lse).

* ``_attn_bwd_preprocess_kernel``: delta = rowsum(dO * O) and lse2 = lse * log2(e)
  (+inf for rows without any allowed key, so their probabilities recompute to 0), rows
  ``lse_rs`` apart: Nq rounded up to a multiple of every query tile, the padding holding
  lse2 = +inf and delta = 0, so the dK/dV loop loads both per tile without a mask, as
  aligned 8-byte copies (with a per-element mask they were 4-byte ones, twice as many).
* ``_attn_bwd_dkdv_kernel``: one program per (batch, kv head, key block): K and V stay in
  registers, the program loops over the query heads of its GQA group and the query tiles
  that see the block, accumulating dK and dV. Deterministic (fixed order, no atomics).
  With ATOMIC_DQ it also adds each tile's dS K into a float32 dQ accumulator (TMA
  reductions or atomic adds; not deterministic), and the dQ kernel is not launched: five
  tile products per tile pair instead of seven. With STORE_DS (the stored-dS strategy,
  parametric path) it also stores each tile's dS into a scratch buffer.
* ``_attn_bwd_dq_ds_kernel``: the stored-dS strategy's dQ pass: dQ = scale * dS K from that
  scratch (one tile product per tile pair instead of three; five in all, no atomics).
* ``_attn_bwd_dq_kernel``: one program per (batch, query head, query block): Q, dO, lse,
  delta stay loaded, the program loops over the key tiles, accumulating dQ. With FUSE_PRE
  (the two-pass default) it runs first and replaces the preprocessing kernel: each program
  computes delta and lse2 of its own rows from O, dO and lse, and stores them (padding
  included) for the dK/dV launch that follows.

With ACCUM (``attention_backward(accumulate_into=...)``), the dK/dV and dQ kernels add their
tiles to what the outputs hold (read, add in float32, write) instead of storing them; each
output tile belongs to one program, so this stays deterministic.

The tile lists and predicates are the forward's (see forward.py / masks.py); the key-block
pass walks the block map transposed. Launched by :mod:`.launch` only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (LOG2E, _col_bounds, _dropout_keep, _dropout_row_hash, _grid_pos, _kv_block_range, _load_rows,
                     _mix32, _pair_mask, _q_block_range, _row_bounds, _row_tile_mask, _rows, _tanh, _tile_mask,
                     _window_mask)

# See forward.py: sizes and scalars are not value-specialised, strides are.
_DNS_PRE = ["Hq", "Nq", "HEAD_DV"]
_DNS_DKDV = ["BHK", "Hq", "Hkv", "GROUP", "Nq", "Nk", "HEAD_D", "HEAD_DV", "win_hs", "doc_pmin", "map_hs",
             "bits_bs", "seed", "drop_thr"]
# SPAN (a multiple of the dK/dV query tile, so of 16) stays specialised: Triton then knows the
# panel rows are 32-byte aligned and loads / stores them as 16-byte vectors (unspecialised,
# they were 2-byte ones)
_DNS_DQDS = ["bh0", "Hq", "GROUP", "Nq", "Nk", "HEAD_D", "win_hs", "doc_pmin"]
_DNS_DQ = ["BH", "Hq", "GROUP", "Nq", "Nk", "HEAD_D", "HEAD_DV", "win_hs", "doc_pmin", "map_hs", "bits_bs",
           "seed", "drop_thr"]


@triton.jit(do_not_specialize=_DNS_PRE)
def _attn_bwd_preprocess_kernel(O, DO, Lse, Delta, Lse2,
                                sob, soh, son, sod, sdb, sdh, sdn, sdd,
                                Hq, Nq, HEAD_DV, lse_rs,
                                BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr):
    # 1-D grid (a grid's y extent stops at 65535: 4M rows / 64 would not fit) over the padded
    # rows: the padding gets lse2 = +inf and delta = 0 (probabilities and dS recompute to 0)
    pid = tl.program_id(0)
    num_m = lse_rs // BLOCK_M
    pid_bh = pid // num_m
    pid_m = pid % num_m
    b64 = (pid_bh // Hq).to(tl.int64)
    h64 = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = _tile_mask(offs_m < Nq, offs_dv < HEAD_DV, EVEN_D)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b64 * sob + h64 * soh + rows * son + offs_dv[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + rows * sdn + offs_dv[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                 # [BM]
    lse = tl.load(Lse + pid_bh.to(tl.int64) * Nq + offs_m, mask=offs_m < Nq, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    base = pid_bh.to(tl.int64) * lse_rs
    tl.store(Delta + base + offs_m, delta)
    tl.store(Lse2 + base + offs_m, lse2)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, qdesc, dodesc, b, h, offs_d, offs_dv, lse_base, delta_base, start_m,
               offs_m, kj, sqn, sqd, sdon, sdod, Nq, Nk, lo, hi, doc_k, DOC_ID, doc_pmin, bits_ptr, bit_r, bit_c,
               x_bh, drop_thr,
               drop_scale, s_in, s_out, dmask, dvmask, dqa_base, dqadesc, bh_acc, HEAD_D, scale,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_MAP: tl.constexpr, HAS_DOCS: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
               MAP_BN: tl.constexpr, I64: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
               ds_row, SPAN, dsdesc, ds_pn, ds_c0, BLOCK_N: tl.constexpr, STORE_DS: tl.constexpr,
               DS_TMA: tl.constexpr):
    """One query tile [start_m, start_m + BM) against the program's keys kj [BN] (transposed tile
    [BN, BM]). lo, hi: with documents (parametric path) each key's allowed query rows [lo, hi]
    ([BN, 1], _col_bounds); otherwise the window / band [L, R] (scalars). With
    ATOMIC_DQ, also adds the tile's share of dQ (scale * dS K, float32) into the accumulator:
    a TMA reduction (DQ_TMA) or atomic adds. With STORE_DS (parametric path), also stores the
    tile's dS (transposed, [BN, BM], q's dtype) into the key block's scratch panel: row n of
    the panel at ``ds_row + n * SPAN``, query row i at column i (``ds_row`` is offset by the
    first query row the key block sees); see _attn_bwd_dq_ds_kernel. DS_TMA: through the
    scratch's TMA descriptor instead (block [1, 1, BN, BM] at (bh_acc, ds_pn, 0, start_m -
    ds_c0)): registers to shared memory, then an asynchronous copy. On the H200 the pointer
    store, which goes through a layout conversion, made the window's dK/dV kernel 45% slower
    than two-pass's; the TMA store 27%."""
    qi = start_m + offs_m                                                   # [BM] query indices
    q = _load_rows(q_base, qdesc, b, h, start_m, qi, Nq, sqn, sqd, offs_d, dmask,
                   MASKED, EVEN_D, USE_TMA, I64, BLOCK_M, BLOCK_D)          # [BM, BD]
    do = _load_rows(do_base, dodesc, b, h, start_m, qi, Nq, sdon, sdod, offs_dv, dvmask,
                    MASKED, EVEN_D, USE_TMA, I64, BLOCK_M, BLOCK_DV)        # [BM, BDV]
    # no mask even past Nq: the rows are padded (lse2 = +inf, delta = 0 there), so the
    # compiler can use 8-byte copies (a per-element mask makes them 4-byte)
    lse2 = tl.load(lse_base + qi)
    delta = tl.load(delta_base + qi)
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)                 # [BN, BD] @ [BD, BM] -> [BN, BM]
    if HAS_SOFTCAP:
        tT = _tanh(sT * s_in)
        zT = tT * s_out
    else:
        zT = sT * s_out
    pT = tl.exp2(zT - lse2[None, :])                                        # [BN, BM]
    if MASKED:
        if HAS_MAP:
            doc_q = doc_k
            if HAS_DOCS:
                doc_q = tl.load(DOC_ID + (tl.minimum(qi, Nq - 1) + (Nk - Nq) - doc_pmin))[None, :]
            ok = _pair_mask(qi[None, :], kj[:, None], Nq, Nk, lo, hi, doc_q, doc_k, bits_ptr,
                            bit_r[None, :], bit_c[:, None], HAS_DOCS, MAP_BN)
        elif HAS_DOCS:
            ok = (qi[None, :] >= lo) & (qi[None, :] <= hi)
        else:
            ok = _window_mask(qi[None, :], kj[:, None], Nq, Nk, lo, hi)
        pT = tl.where(ok, pT, 0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)               # [BN, BDV] @ [BDV, BM] -> [BN, BM]
    if HAS_DROPOUT:
        x_row = _mix32(x_bh ^ qi.to(tl.uint32))
        keep = _dropout_keep(x_row[None, :], kj[:, None], drop_thr)
        pdT = tl.where(keep, pT * drop_scale, 0.0)
        dpT = tl.where(keep, dpT * drop_scale, 0.0)
    else:
        pdT = pT
    # (dV before dP, FlexAttention's order, spilled less in the masked steps of (64, 128, 8
    # warps) on sm_90 (4 vs 14 words) but more in the unmasked ones (4 vs 1); so not here)
    dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=DOT_PREC)       # [BN, BM] @ [BM, BDV] -> [BN, BDV]
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dsT = dsT.to(q.dtype)
    dk = tl.dot(dsT, q, dk, input_precision=DOT_PREC)                     # [BN, BM] @ [BM, BD] -> [BN, BD]
    if STORE_DS:
        if DS_TMA:
            dsdesc.store([bh_acc, ds_pn, 0, start_m - ds_c0], dsT.reshape(1, 1, BLOCK_N, BLOCK_M))
        else:
            tl.store(ds_row + tl.arange(0, BLOCK_N)[:, None] * SPAN + qi[None, :], dsT)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dsT), k, input_precision=DOT_PREC) * scale   # [BM, BN] @ [BN, BD] -> [BM, BD]
        if DQ_TMA:
            dqadesc.atomic_add([0, bh_acc, start_m, 0], dq.reshape(1, 1, BLOCK_M, BLOCK_D))
        else:
            tl.atomic_add(dqa_base + _rows(qi, I64) * HEAD_D + offs_d[None, :], dq,
                          mask=(qi < Nq)[:, None] & dmask[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=_DNS_DKDV)
def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, Lse2, Delta,
        WIN, DOC_ID, DOC_RANGE,
        ROW_M, COL_M, BIT_M, ROW_F, COL_F, BITS,        # transposed lists: rows = (head, key map block)
        ORDER,                                          # HAS_ORDER: program -> grid position
        QD, DOD,                                        # TMA descriptors of Q, dO (USE_TMA) or Q, dO again
        DQA, DQAD, bhk0,                                # ATOMIC_DQ: float32 dQ accumulator (1, chunk * GROUP, Nq,
                                                        # HEAD_D) of (batch, kv head) bhk0 on, its descriptor
        DS, DSD, SPAN,                                  # STORE_DS: dS scratch (chunk * GROUP, key blocks, BLOCK_N,
                                                        # SPAN) of (batch, kv head) bhk0 on, its descriptor
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
        sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
        BHK, Hq, Hkv, GROUP, Nq, Nk, HEAD_D, HEAD_DV, lse_rs,
        win_hs, doc_pmin, map_hs, bits_bs,
        s_in, s_out, scale, seed, drop_thr, drop_scale, hgroup,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        EVEN_D: tl.constexpr, MAP_BM: tl.constexpr, MAP_BN: tl.constexpr,
        HAS_MAP: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        DOT_PREC: tl.constexpr, I64: tl.constexpr, USE_TMA: tl.constexpr, HAS_ORDER: tl.constexpr,
        ATOMIC_DQ: tl.constexpr = False, DQ_TMA: tl.constexpr = False, LEAD: tl.constexpr = True,
        TRAIL: tl.constexpr = True, STORE_DS: tl.constexpr = False, DS_TMA: tl.constexpr = False,
        ACCUM: tl.constexpr = False):
    # 1-D grid: the key blocks of one kv head are adjacent (they share Q/dO in L2), first
    # block first (causal: key block 0 is seen by every query). hgroup > 1 (two-pass only):
    # kv heads in groups, each group's first key blocks first across its heads (_grid_pos).
    # torch.compile (Inductor) passes Python floats as fp64: keep the maths in fp32
    s_in = tl.cast(s_in, tl.float32)
    s_out = tl.cast(s_out, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    if HAS_ORDER:
        pid = tl.load(ORDER + pid)
    num_n = tl.cdiv(Nk, BLOCK_N)
    rel, n_rev = _grid_pos(pid, num_n, BHK - bhk0, hgroup)
    pid_bhk = rel + bhk0
    pid_n = num_n - 1 - n_rev
    b = pid_bhk // Hkv
    hk = pid_bhk % Hkv
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)                                     # [BN] key indices
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dmask = offs_d < HEAD_D
    dvmask = offs_dv < HEAD_DV
    kin = offs_n < Nk
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b64 * skb + hk64 * skh + rows_n * skn + offs_d[None, :] * skd,
                mask=_tile_mask(kin, dmask, EVEN_D), other=0.0)            # [BN, BD]
    v = tl.load(V + b64 * svb + hk64 * svh + rows_n * svn + offs_dv[None, :] * svd,
                mask=_tile_mask(kin, dvmask, EVEN_D), other=0.0)           # [BN, BDV]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    doc_k = offs_n[:, None]
    if HAS_MAP and HAS_DOCS:      # band-and-globals: the global flag of each key
        doc_k = tl.load(DOC_ID + (tl.minimum(offs_n, Nk - 1) - doc_pmin))[:, None]
    bit_c = (n0 % MAP_BN) + tl.arange(0, BLOCK_N)                           # columns inside the map tile

    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        h64 = h.to(tl.int64)
        q_base = Q + b64 * sqb + h64 * sqh
        do_base = DO + b64 * sdob + h64 * sdoh
        lse_base = Lse2 + bh.to(tl.int64) * lse_rs
        delta_base = Delta + bh.to(tl.int64) * lse_rs
        bh_acc = (pid_bhk - bhk0) * GROUP + g                                # accumulator row of (b, h)
        dqa_base = DQA + bh_acc.to(tl.int64) * Nq * HEAD_D
        ds_row = DS
        ds_c0 = 0
        x_bh = tl.cast(g, tl.uint32)
        if HAS_DROPOUT:
            x_bh = _mix32((bh ^ seed).to(tl.uint32))
        L = tl.load(WIN + 2 * h * win_hs)                                  # see the forward kernel
        R = tl.load(WIN + 2 * h * win_hs + 1)
        if HAS_MAP:
            row = h * map_hs + n0 // MAP_BN
            SUBS: tl.constexpr = MAP_BM // BLOCK_M                            # flat (tile, sub-tile) loop
            e_lo = tl.load(ROW_M + row)
            e_hi = tl.load(ROW_M + row + 1)
            for i in range(e_lo * SUBS, e_hi * SUBS):
                e = i // SUBS
                sub = tl.cast(i % SUBS, tl.int32)
                qb = tl.load(COL_M + e)
                bits_ptr = BITS + b64 * bits_bs + tl.load(BIT_M + e).to(tl.int64) * ((MAP_BM // 32) * MAP_BN)
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, QD, DOD, b, h, offs_d, offs_dv, lse_base, delta_base,
                    qb * MAP_BM + sub * BLOCK_M, offs_m, offs_n, sqn, sqd, sdon, sdod, Nq, Nk, L, R, doc_k, DOC_ID,
                    doc_pmin, bits_ptr, sub * BLOCK_M + offs_m, bit_c, x_bh, drop_thr, drop_scale, s_in, s_out,
                    dmask, dvmask, dqa_base, DQAD, bh_acc, HEAD_D, scale, True, EVEN_D, HAS_MAP, HAS_DOCS,
                    HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA, BLOCK_M, BLOCK_D, BLOCK_DV,
                    ATOMIC_DQ, DQ_TMA, DQA, 0, DQA, 0, 0, BLOCK_N, False, False)
            f_lo = tl.load(ROW_F + row)
            f_hi = tl.load(ROW_F + row + 1)
            for i in range(f_lo * SUBS, f_hi * SUBS):
                qb = tl.load(COL_F + i // SUBS)
                sub = tl.cast(i % SUBS, tl.int32)
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, QD, DOD, b, h, offs_d, offs_dv, lse_base, delta_base,
                    qb * MAP_BM + sub * BLOCK_M, offs_m, offs_n, sqn, sqd, sdon, sdod, Nq, Nk, 0, 0, doc_k, DOC_ID,
                    doc_pmin, BITS, offs_m, bit_c, x_bh, drop_thr, drop_scale, s_in, s_out,
                    dmask, dvmask, dqa_base, DQAD, bh_acc, HEAD_D, scale, False, EVEN_D, HAS_MAP, False,
                    HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA, BLOCK_M, BLOCK_D, BLOCK_DV,
                    ATOMIC_DQ, DQ_TMA, DQA, 0, DQA, 0, 0, BLOCK_N, False, False)
        else:
            lo_b, flo_b, fhi_b, hi_b = _q_block_range(n0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin,
                                                      BLOCK_M, BLOCK_N, HAS_DOCS)
            if STORE_DS:      # this key block's panel, shifted so that query row i is column i
                ds_c0 = lo_b * BLOCK_M
                ds_row = DS + (bh_acc.to(tl.int64) * num_n + pid_n) * BLOCK_N * SPAN - ds_c0
            lo_c, hi_c = _col_bounds(offs_n, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS)
            if LEAD:      # compiled out where empty (a full mask)
                for blk in range(lo_b, flo_b):
                    dk, dv = _dkdv_step(
                        dk, dv, k, v, q_base, do_base, QD, DOD, b, h, offs_d, offs_dv, lse_base, delta_base,
                        blk * BLOCK_M, offs_m,
                        offs_n, sqn, sqd, sdon, sdod, Nq, Nk, lo_c, hi_c, doc_k, DOC_ID, doc_pmin, BITS, offs_m,
                        bit_c, x_bh, drop_thr,
                        drop_scale, s_in, s_out, dmask, dvmask, dqa_base, DQAD, bh_acc, HEAD_D, scale,
                        True, EVEN_D, False, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA,
                        BLOCK_M, BLOCK_D, BLOCK_DV, ATOMIC_DQ, DQ_TMA, ds_row, SPAN, DSD, pid_n, ds_c0, BLOCK_N,
                        STORE_DS, DS_TMA)
            for blk in range(flo_b, fhi_b):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, QD, DOD, b, h, offs_d, offs_dv, lse_base, delta_base,
                    blk * BLOCK_M, offs_m,
                    offs_n, sqn, sqd, sdon, sdod, Nq, Nk, lo_c, hi_c, doc_k, DOC_ID, doc_pmin, BITS, offs_m,
                    bit_c, x_bh, drop_thr,
                    drop_scale, s_in, s_out, dmask, dvmask, dqa_base, DQAD, bh_acc, HEAD_D, scale,
                    False, EVEN_D, False, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA,
                    BLOCK_M, BLOCK_D, BLOCK_DV, ATOMIC_DQ, DQ_TMA, ds_row, SPAN, DSD, pid_n, ds_c0, BLOCK_N,
                    STORE_DS, DS_TMA)
            if TRAIL:     # compiled out where empty (full / causal, whole query blocks)
                for blk in range(fhi_b, hi_b):
                    dk, dv = _dkdv_step(
                        dk, dv, k, v, q_base, do_base, QD, DOD, b, h, offs_d, offs_dv, lse_base, delta_base,
                        blk * BLOCK_M, offs_m,
                        offs_n, sqn, sqd, sdon, sdod, Nq, Nk, lo_c, hi_c, doc_k, DOC_ID, doc_pmin, BITS, offs_m,
                        bit_c, x_bh, drop_thr,
                        drop_scale, s_in, s_out, dmask, dvmask, dqa_base, DQAD, bh_acc, HEAD_D, scale,
                        True, EVEN_D, False, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA,
                        BLOCK_M, BLOCK_D, BLOCK_DV, ATOMIC_DQ, DQ_TMA, ds_row, SPAN, DSD, pid_n, ds_c0, BLOCK_N,
                        STORE_DS, DS_TMA)

    dk = dk * scale
    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + rows_n * sdkn + offs_d[None, :] * sdkd
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + rows_n * sdvn + offs_dv[None, :] * sdvd
    if ACCUM:     # add to what DK / DV hold (one program per key block: no race)
        dk += tl.load(dk_ptrs, mask=_tile_mask(kin, dmask, EVEN_D), other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=_tile_mask(kin, dvmask, EVEN_D), other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=_tile_mask(kin, dmask, EVEN_D))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=_tile_mask(kin, dvmask, EVEN_D))


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, kdesc, vdesc, b, hk, offs_d, offs_dv, start_n, offs_n, qi,
             skn, skd, svn, svd,
             Nq, Nk, lo, hi, doc_q, DOC_ID, doc_pmin, bits_ptr, bit_r, bit_c, x_row, drop_thr, drop_scale,
             s_in, s_out, dmask, dvmask,
             MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_MAP: tl.constexpr, HAS_DOCS: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
             MAP_BN: tl.constexpr, I64: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key tile [start_n, start_n + BN) against the program's queries (tile [BM, BN]); lo, hi
    as in the forward's step."""
    kj = start_n + offs_n
    k = _load_rows(k_base, kdesc, b, hk, start_n, kj, Nk, skn, skd, offs_d, dmask,
                   MASKED, EVEN_D, USE_TMA, I64, BLOCK_N, BLOCK_D)          # [BN, BD]
    v = _load_rows(v_base, vdesc, b, hk, start_n, kj, Nk, svn, svd, offs_dv, dvmask,
                   MASKED, EVEN_D, USE_TMA, I64, BLOCK_N, BLOCK_DV)         # [BN, BDV]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                  # [BM, BD] @ [BD, BN] -> [BM, BN]
    if HAS_SOFTCAP:
        t = _tanh(s * s_in)
        z = t * s_out
    else:
        z = s * s_out
    p = tl.exp2(z - lse2[:, None])
    if MASKED:
        ok = _row_tile_mask(qi, kj, Nq, Nk, lo, hi, doc_q, DOC_ID, doc_pmin, bits_ptr, bit_r, bit_c,
                            HAS_MAP, HAS_DOCS, MAP_BN)
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)                # [BM, BDV] @ [BDV, BN] -> [BM, BN]
    if HAS_DROPOUT:
        dp = tl.where(_dropout_keep(x_row[:, None], kj[None, :], drop_thr), dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)          # [BM, BN] @ [BN, BD] -> [BM, BD]
    return dq


@triton.jit(do_not_specialize=_DNS_DQ)
def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, Lse2, Delta,
        O, Lse,                                         # FUSE_PRE: the output and natural-log lse
        WIN, DOC_ID, DOC_RANGE,
        ROW_M, COL_M, BIT_M, ROW_F, COL_F, BITS,
        ORDER,                                          # HAS_ORDER: program -> grid position
        KD, VD,                                         # TMA descriptors of K, V (USE_TMA) or K, V again
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
        sdqb, sdqh, sdqn, sdqd, sob, soh, son, sod,
        BH, Hq, GROUP, Nq, Nk, HEAD_D, HEAD_DV, lse_rs,
        win_hs, doc_pmin, map_hs, bits_bs,
        s_in, s_out, scale, seed, drop_thr, drop_scale, hgroup,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        EVEN_D: tl.constexpr, MAP_BM: tl.constexpr, MAP_BN: tl.constexpr,
        HAS_MAP: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        DOT_PREC: tl.constexpr, I64: tl.constexpr, USE_TMA: tl.constexpr, HAS_ORDER: tl.constexpr,
        LEAD: tl.constexpr = True, TRAIL: tl.constexpr = True, FUSE_PRE: tl.constexpr = False,
        ACCUM: tl.constexpr = False):
    # ACCUM: add this tile's dQ to what DQ holds (read, add in fp32, write) instead of storing it.
    # FUSE_PRE: this kernel runs first and does the preprocessing itself: each program computes
    # delta = rowsum(dO * O) and lse2 of its own rows (one extra load of the O tile) and stores
    # both for the dK/dV launch that follows; the last query block of each head also writes
    # the padding rows up to lse_rs (lse2 = +inf, delta = 0). One launch less, and O and dO
    # are not read twice.
    # torch.compile (Inductor) passes Python floats as fp64: keep the maths in fp32
    s_in = tl.cast(s_in, tl.float32)
    s_out = tl.cast(s_out, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)                                                  # grid order: see forward
    if HAS_ORDER:
        pid = tl.load(ORDER + pid)
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid_bh, pid_m = _grid_pos(pid, num_m, BH, hgroup)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dmask = offs_d < HEAD_D
    dvmask = offs_dv < HEAD_DV
    qin = offs_m < Nq
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b64 * sqb + h64 * sqh + rows * sqn + offs_d[None, :] * sqd,
                mask=_tile_mask(qin, dmask, EVEN_D), other=0.0)            # [BM, BD]
    do = tl.load(DO + b64 * sdob + h64 * sdoh + rows * sdon + offs_dv[None, :] * sdod,
                 mask=_tile_mask(qin, dvmask, EVEN_D), other=0.0)          # [BM, BDV]
    r_base = pid_bh.to(tl.int64) * lse_rs
    if FUSE_PRE:
        o = tl.load(O + b64 * sob + h64 * soh + rows * son + offs_dv[None, :] * sod,
                    mask=_tile_mask(qin, dvmask, EVEN_D), other=0.0)      # [BM, BDV]
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)             # [BM]
        lse = tl.load(Lse + pid_bh.to(tl.int64) * Nq + offs_m, mask=qin, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        tl.store(Delta + r_base + offs_m, delta, mask=offs_m < lse_rs)
        tl.store(Lse2 + r_base + offs_m, lse2, mask=offs_m < lse_rs)
        if pid_m == num_m - 1:
            for r0 in range(num_m * BLOCK_M, lse_rs, BLOCK_M):
                pad = r0 + tl.arange(0, BLOCK_M)
                tl.store(Delta + r_base + pad, tl.zeros([BLOCK_M], dtype=tl.float32), mask=pad < lse_rs)
                tl.store(Lse2 + r_base + pad, tl.full([BLOCK_M], float("inf"), dtype=tl.float32), mask=pad < lse_rs)
    else:
        lse2 = tl.load(Lse2 + r_base + offs_m, mask=qin, other=float("inf"))
        delta = tl.load(Delta + r_base + offs_m, mask=qin, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    x_row = offs_m.to(tl.uint32)
    if HAS_DROPOUT:
        x_row = _dropout_row_hash(pid_bh, seed, offs_m)

    L = tl.load(WIN + 2 * h * win_hs)                                      # see the forward kernel
    R = tl.load(WIN + 2 * h * win_hs + 1)
    doc_q = offs_m[:, None]
    if HAS_MAP and HAS_DOCS:      # band-and-globals: the global flag of each row
        doc_q = tl.load(DOC_ID + (tl.minimum(offs_m, Nq - 1) + (Nk - Nq) - doc_pmin))[:, None]
    if HAS_MAP:
        row = h * map_hs + m0 // MAP_BM
        bit_r = (m0 % MAP_BM) + tl.arange(0, BLOCK_M)
        SUBS: tl.constexpr = MAP_BN // BLOCK_N                                # flat (tile, sub-tile) loop
        e_lo = tl.load(ROW_M + row)
        e_hi = tl.load(ROW_M + row + 1)
        for i in range(e_lo * SUBS, e_hi * SUBS):
            e = i // SUBS
            sub = tl.cast(i % SUBS, tl.int32)
            kb = tl.load(COL_M + e)
            bits_ptr = BITS + b64 * bits_bs + tl.load(BIT_M + e).to(tl.int64) * ((MAP_BM // 32) * MAP_BN)
            dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv,
                          kb * MAP_BN + sub * BLOCK_N, offs_n, offs_m, skn, skd, svn, svd, Nq, Nk, L, R, doc_q,
                          DOC_ID, doc_pmin, bits_ptr, bit_r, sub * BLOCK_N + offs_n, x_row, drop_thr, drop_scale,
                          s_in, s_out, dmask, dvmask, True, EVEN_D, HAS_MAP, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT,
                          DOT_PREC, MAP_BN, I64, USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV)
        f_lo = tl.load(ROW_F + row)
        f_hi = tl.load(ROW_F + row + 1)
        for i in range(f_lo * SUBS, f_hi * SUBS):
            kb = tl.load(COL_F + i // SUBS)
            sub = tl.cast(i % SUBS, tl.int32)
            dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv,
                          kb * MAP_BN + sub * BLOCK_N, offs_n, offs_m, skn, skd, svn, svd, Nq, Nk, 0, 0, 0, DOC_ID,
                          doc_pmin, BITS, bit_r, offs_n, x_row, drop_thr, drop_scale, s_in, s_out, dmask, dvmask,
                          False, EVEN_D, HAS_MAP, False, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA,
                          BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        lo_b, flo_b, fhi_b, hi_b = _kv_block_range(m0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin,
                                                   BLOCK_M, BLOCK_N, HAS_DOCS)
        lo_r, hi_r = _row_bounds(offs_m, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS)
        if LEAD:      # compiled out where empty (full and causal masks)
            for blk in range(lo_b, flo_b):
                dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, blk * BLOCK_N,
                              offs_n, offs_m, skn, skd, svn, svd, Nq, Nk, lo_r, hi_r, doc_q, DOC_ID, doc_pmin, BITS,
                              offs_m,
                              offs_n, x_row, drop_thr, drop_scale, s_in, s_out, dmask, dvmask, True, EVEN_D, False,
                              HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA, BLOCK_N, BLOCK_D,
                              BLOCK_DV)
        for blk in range(flo_b, fhi_b):
            dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, blk * BLOCK_N,
                          offs_n, offs_m, skn, skd, svn, svd, Nq, Nk, lo_r, hi_r, doc_q, DOC_ID, doc_pmin, BITS, offs_m,
                          offs_n, x_row, drop_thr, drop_scale, s_in, s_out, dmask, dvmask, False, EVEN_D, False,
                          HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA, BLOCK_N, BLOCK_D,
                          BLOCK_DV)
        if TRAIL:     # compiled out where empty (a full mask, whole key blocks)
            for blk in range(fhi_b, hi_b):
                dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, blk * BLOCK_N,
                              offs_n, offs_m, skn, skd, svn, svd, Nq, Nk, lo_r, hi_r, doc_q, DOC_ID, doc_pmin, BITS,
                              offs_m,
                              offs_n, x_row, drop_thr, drop_scale, s_in, s_out, dmask, dvmask, True, EVEN_D, False,
                              HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA, BLOCK_N, BLOCK_D,
                              BLOCK_DV)

    dq = dq * scale
    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + rows * sdqn + offs_d[None, :] * sdqd
    if ACCUM:
        dq += tl.load(dq_ptrs, mask=_tile_mask(qin, dmask, EVEN_D), other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=_tile_mask(qin, dmask, EVEN_D))


@triton.jit(do_not_specialize=_DNS_DQDS)
def _attn_bwd_dq_ds_kernel(
        K, DQ, DS, WIN, DOC_ID, DOC_RANGE,
        KD,                                             # TMA descriptor of K (USE_TMA) or K again
        skb, skh, skn, skd, sdqb, sdqh, sdqn, sdqd,
        bh0, Hq, GROUP, Nq, Nk, HEAD_D, SPAN, win_hs, doc_pmin, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
        KV_BM: tl.constexpr,
        HAS_DOCS: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr, USE_TMA: tl.constexpr):
    """The stored-dS backward's dQ pass (parametric path): dQ = scale * dS K, with dS read
    from the panels that the dK/dV pass wrote (STORE_DS) instead of recomputed: one tile
    product per tile pair instead of three, and no exponentials. One program per (query head
    of the chunk, BLOCK_M query rows); key blocks of BLOCK_N, the dK/dV pass's. Key block j's
    panel holds the query rows of its query range (the dK/dV loop's, in blocks of KV_BM);
    rows outside it hold no allowed pair with j and are read as zeros."""
    scale = tl.cast(scale, tl.float32)
    pid = tl.program_id(0)
    num_m = tl.cdiv(Nq, BLOCK_M)
    num_n = tl.cdiv(Nk, BLOCK_N)
    r = pid // num_m
    pid_m = num_m - 1 - pid % num_m
    bh = bh0 + r
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    k_base = K + b64 * skb + hk64 * skh
    L = tl.load(WIN + 2 * h * win_hs)
    R = tl.load(WIN + 2 * h * win_hs + 1)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_D
    ds_head = DS + r.to(tl.int64) * num_n * BLOCK_N * SPAN
    lo_b, _flo, _fhi, hi_b = _kv_block_range(m0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin,
                                             BLOCK_M, BLOCK_N, HAS_DOCS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    panel = ds_head + lo_b.to(tl.int64) * BLOCK_N * SPAN                   # key block lo_b's panel
    for blk in range(lo_b, hi_b):
        q_lo, _a, _b, q_hi = _q_block_range(blk * BLOCK_N, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin,
                                            KV_BM, BLOCK_N, HAS_DOCS)
        col = offs_m - q_lo * KV_BM                                         # [BM] columns of the panel
        written = (offs_m >= q_lo * KV_BM) & (offs_m < q_hi * KV_BM)
        dsT = tl.load(panel + offs_n[:, None] * SPAN + col[None, :], mask=written[None, :], other=0.0)  # [BN, BM]
        k = _load_rows(k_base, KD, b, hk, blk * BLOCK_N, blk * BLOCK_N + offs_n, Nk, skn, skd, offs_d, dmask,
                       True, EVEN_D, USE_TMA, I64, BLOCK_N, BLOCK_D)             # [BN, BD]
        dq = tl.dot(tl.trans(dsT), k, dq, input_precision=DOT_PREC)           # [BM, BN] @ [BN, BD] -> [BM, BD]
        panel += BLOCK_N * SPAN
    dq = dq * scale
    rows = offs_m[:, None].to(tl.int64)
    tl.store(DQ + b64 * sdqb + h64 * sdqh + rows * sdqn + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
             mask=_tile_mask(offs_m < Nq, dmask, EVEN_D))
