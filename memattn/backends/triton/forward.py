"""Forward kernel: tiled online softmax (FlashAttention-2 style) over the allowed key tiles.

One program computes BLOCK_M query rows of one (batch, query head). Its key tiles come from
either the parametric range (window / causal / documents: edge tiles with the predicate,
inner tiles without) or the block map (masked tiles with a bit tile, full tiles without).
Launched by :mod:`.launch` only (the launcher checks every argument).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (LN2, _dropout_keep, _dropout_row_hash, _grid_pos, _kv_block_range, _load_rows, _row_bounds,
                     _row_tile_mask, _tanh, _tile_mask)

# Sizes and scalars that only enter comparisons: no value specialisation (one compile serves
# every sequence length); strides keep theirs (stride 1 and 16-divisibility vectorise loads).
_DNS_FWD = ["BH", "Hq", "GROUP", "Nq", "Nk", "HEAD_D", "HEAD_DV", "win_hs", "doc_pmin", "map_hs", "bits_bs",
            "seed", "drop_thr", "n_split", "so_split", "sl_split"]


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, kdesc, vdesc, b, hk, offs_d, offs_dv, start_n, offs_n, qi,
              skn, skd, svn, svd, Nq, Nk, lo, hi, doc_q, DOC_ID, doc_pmin, bits_ptr, bit_r, bit_c, x_row, drop_thr,
              s_in, s_out, dmask, dvmask,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_MAP: tl.constexpr, HAS_DOCS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
              MAP_BN: tl.constexpr, I64: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One key tile: update (acc [BM, BDV], l_i [BM], m_i [BM]) with keys [start_n, start_n + BN).

    lo, hi: with documents (parametric path) each row's allowed keys [lo, hi] ([BM, 1],
    _row_bounds); otherwise the window / band [L, R] (scalars)."""
    kj = start_n + offs_n                                                   # [BN] key indices
    # Addresses are rebuilt per tile (nothing tile-sized stays live across iterations:
    # hoisted offset tiles cost the registers the accumulators need), or TMA loads.
    k = _load_rows(k_base, kdesc, b, hk, start_n, kj, Nk, skn, skd, offs_d, dmask,
                   MASKED, EVEN_D, USE_TMA, I64, BLOCK_N, BLOCK_D)          # [BN, BD]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)                  # [BM, BD] @ [BD, BN] -> [BM, BN]
    if HAS_SOFTCAP:
        s = _tanh(s * s_in) * s_out                                         # exp2-domain logits
        c = 1.0
    else:
        c = s_out                                                           # scale * log2(e), applied below
    if MASKED:
        ok = _row_tile_mask(qi, kj, Nq, Nk, lo, hi, doc_q, DOC_ID, doc_pmin, bits_ptr, bit_r, bit_c,
                            HAS_MAP, HAS_DOCS, MAP_BN)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)                # rows with nothing yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        m_use = m_new
    p = tl.exp2(s * c - m_use[:, None])                                     # [BM, BN]
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_rows(v_base, vdesc, b, hk, start_n, kj, Nk, svn, svd, offs_dv, dvmask,
                   MASKED, EVEN_D, USE_TMA, I64, BLOCK_N, BLOCK_DV)         # [BN, BDV]
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(x_row[:, None], kj[None, :], drop_thr), p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)          # [BM, BN] @ [BN, BDV] -> [BM, BDV]
    return acc, l_i, m_new


@triton.jit(do_not_specialize=_DNS_FWD)
def _attn_fwd_kernel(
        Q, K, V, Out, Lse,  # (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, DV), out, lse fp32 (B*Hq, Nq)
        WIN, DOC_ID, DOC_RANGE,                     # parametric: int32 (Hw, 2), (Nk - pmin,), (docs + 1, 2)
        ROW_M, COL_M, BIT_M, ROW_F, COL_F, BITS,    # block map: masked / full tile lists, bit tiles
        ORDER,                                      # HAS_ORDER: program -> grid position (longest first)
        KD, VD,                                     # TMA descriptors of K, V (USE_TMA) or K, V again
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
        BH, Hq, GROUP, Nq, Nk, HEAD_D, HEAD_DV,
        win_hs, doc_pmin, map_hs, bits_bs,
        s_in, s_out, seed, drop_thr, drop_scale,
        n_split, so_split, sl_split,                # split-KV: splits, element strides of the partials
        hgroup,                                     # heads per group of the grid order (_grid_pos)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        EVEN_D: tl.constexpr, MAP_BM: tl.constexpr, MAP_BN: tl.constexpr,
        HAS_MAP: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        DOT_PREC: tl.constexpr, I64: tl.constexpr, USE_TMA: tl.constexpr, SPLIT: tl.constexpr,
        HAS_ORDER: tl.constexpr, LEAD: tl.constexpr = True, TRAIL: tl.constexpr = True):
    # 1-D grid: the query blocks of one head are adjacent (they share K/V in L2), last block
    # first (causal: the longest rows start first). With SPLIT (parametric path only, when
    # the grid would not fill the GPU, e.g. decoding), each (head, query block) is n_split
    # programs, each over a contiguous share of its key blocks; they write float32 partial
    # outputs and lse (Out, Lse offset by split * so_split / sl_split), merged by the launcher.
    # torch.compile (Inductor) passes Python floats as fp64: keep the maths in fp32
    s_in = tl.cast(s_in, tl.float32)
    s_out = tl.cast(s_out, tl.float32)
    drop_scale = tl.cast(drop_scale, tl.float32)
    pid = tl.program_id(0)
    if HAS_ORDER:         # block map with a few long rows (global tokens): those run first
        pid = tl.load(ORDER + pid)
    split = 0
    if SPLIT:
        split = pid % n_split
        pid = pid // n_split
    num_m = tl.cdiv(Nq, BLOCK_M)
    pid_bh, pid_m = _grid_pos(pid, num_m, BH, hgroup)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    q_base = Q + b64 * sqb + h64 * sqh
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)                                     # [BM] query indices
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dmask = offs_d < HEAD_D
    dvmask = offs_dv < HEAD_DV
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=_tile_mask(offs_m < Nq, dmask, EVEN_D), other=0.0)     # [BM, BD]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    x_row = offs_m.to(tl.uint32)
    if HAS_DROPOUT:
        x_row = _dropout_row_hash(pid_bh, seed, offs_m)

    # window [L, R] of this head and the document (or, on the map path, global flag) of each
    # query row; on the bit-tile map path WIN is a dummy and these go unused
    L = tl.load(WIN + 2 * h * win_hs)
    R = tl.load(WIN + 2 * h * win_hs + 1)
    doc_q = offs_m[:, None]
    if HAS_MAP:
        if HAS_DOCS:      # band-and-globals: the global flag of each row
            qrow = tl.minimum(offs_m, Nq - 1) + (Nk - Nq)
            doc_q = tl.load(DOC_ID + (qrow - doc_pmin))[:, None]
        row = h * map_hs + m0 // MAP_BM
        bit_r = (m0 % MAP_BM) + tl.arange(0, BLOCK_M)                       # rows inside the map tile
        # one flat loop over (tile, sub-tile) pairs: a single load site per list, so the
        # pipeline buffers are allocated once (a static sub-tile loop multiplies them)
        SUBS: tl.constexpr = MAP_BN // BLOCK_N
        e_lo = tl.load(ROW_M + row)
        e_hi = tl.load(ROW_M + row + 1)
        for i in range(e_lo * SUBS, e_hi * SUBS):
            e = i // SUBS
            sub = tl.cast(i % SUBS, tl.int32)
            kb = tl.load(COL_M + e)
            bits_ptr = BITS + b64 * bits_bs + tl.load(BIT_M + e).to(tl.int64) * ((MAP_BM // 32) * MAP_BN)
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, kb * MAP_BN + sub * BLOCK_N,
                offs_n, offs_m, skn, skd, svn, svd, Nq, Nk, L, R, doc_q, DOC_ID, doc_pmin, bits_ptr, bit_r,
                sub * BLOCK_N + offs_n, x_row, drop_thr, s_in, s_out, dmask, dvmask,
                True, EVEN_D, HAS_MAP, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA, BLOCK_N,
                BLOCK_D, BLOCK_DV)
        f_lo = tl.load(ROW_F + row)
        f_hi = tl.load(ROW_F + row + 1)
        for i in range(f_lo * SUBS, f_hi * SUBS):
            kb = tl.load(COL_F + i // SUBS)
            sub = tl.cast(i % SUBS, tl.int32)
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, kb * MAP_BN + sub * BLOCK_N,
                offs_n, offs_m, skn, skd, svn, svd, Nq, Nk, 0, 0, 0, DOC_ID, doc_pmin, BITS, bit_r, offs_n, x_row,
                drop_thr, s_in, s_out, dmask, dvmask,
                False, EVEN_D, HAS_MAP, False, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64, USE_TMA,
                BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        lo_b, flo_b, fhi_b, hi_b = _kv_block_range(m0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin,
                                                   BLOCK_M, BLOCK_N, HAS_DOCS)
        lo_r, hi_r = _row_bounds(offs_m, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS)
        if SPLIT:      # this program's share [a, e) of the key blocks, cut out of the three loops
            per = tl.cdiv(hi_b - lo_b, n_split)
            a = lo_b + split * per
            e = tl.minimum(hi_b, a + per)
            flo_b = tl.maximum(tl.minimum(flo_b, e), a)
            fhi_b = tl.maximum(tl.minimum(fhi_b, e), flo_b)
            lo_b = tl.minimum(tl.maximum(lo_b, a), flo_b)
            hi_b = tl.maximum(tl.minimum(hi_b, e), fhi_b)
        if LEAD:      # compiled out where the launcher knows the loop is empty (full, causal)
            for blk in range(lo_b, flo_b):                                 # leading edge tiles
                acc, l_i, m_i = _fwd_step(
                    acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, blk * BLOCK_N, offs_n, offs_m,
                    skn, skd, svn, svd,
                    Nq, Nk, lo_r, hi_r, doc_q, DOC_ID, doc_pmin, BITS, offs_m, offs_n, x_row, drop_thr, s_in, s_out,
                    dmask, dvmask, True, EVEN_D, False, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64,
                    USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV)
        for blk in range(flo_b, fhi_b):                                    # inner tiles: no predicate
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, blk * BLOCK_N, offs_n, offs_m,
                skn, skd, svn, svd,
                Nq, Nk, lo_r, hi_r, doc_q, DOC_ID, doc_pmin, BITS, offs_m, offs_n, x_row, drop_thr, s_in, s_out,
                dmask, dvmask, False, EVEN_D, False, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64,
                USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV)
        if TRAIL:     # compiled out for a full mask whose last key block is whole
            for blk in range(fhi_b, hi_b):                                 # trailing edge (the diagonal)
                acc, l_i, m_i = _fwd_step(
                    acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, offs_d, offs_dv, blk * BLOCK_N, offs_n, offs_m,
                    skn, skd, svn, svd,
                    Nq, Nk, lo_r, hi_r, doc_q, DOC_ID, doc_pmin, BITS, offs_m, offs_n, x_row, drop_thr, s_in, s_out,
                    dmask, dvmask, True, EVEN_D, False, HAS_DOCS, HAS_SOFTCAP, HAS_DROPOUT, DOT_PREC, MAP_BN, I64,
                    USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV)

    # Rows with no allowed key: out 0, lse -inf.
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * drop_scale
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    row_ok = offs_m < Nq
    o_base = Out
    l_base = Lse
    if SPLIT:
        o_base = Out + split.to(tl.int64) * so_split
        l_base = Lse + split.to(tl.int64) * sl_split
    o_ptrs = o_base + b64 * sob + h64 * soh + offs_m[:, None].to(tl.int64) * son + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=_tile_mask(row_ok, dvmask, EVEN_D))
    tl.store(l_base + pid_bh.to(tl.int64) * Nq + offs_m, lse, mask=row_ok)
