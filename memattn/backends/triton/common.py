"""Triton helpers shared by the forward and backward kernels (imported lazily: needs triton).

Conventions (see docs for derivations): scores live in the exp2 domain, ``z = s * scale *
log2(e)`` (or ``softcap * log2(e) * tanh(s * scale / softcap)``); an lse passed between
kernels is ``lse * log2(e)``. Query i sits at position ``i + Nk - Nq``; key j at j.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E_F = 1.4426950408889634
LN2_F = 0.6931471805599453
LOG2E = tl.constexpr(LOG2E_F)   # kernels may only read constexpr globals
LN2 = tl.constexpr(LN2_F)


@triton.jit
def _tanh(x):
    """float32 tanh accurate to a few ulp: an odd Taylor polynomial for |x| < 0.25, the exp
    form (1 - e) / (1 + e), e = exp(-2|x|), elsewhere (no cancellation in either)."""
    ax = tl.abs(x)
    e = tl.exp2(ax * -2.8853900817779268)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    poly = 1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197))))
    return tl.where(ax < 0.25, x * poly, tl.where(x < 0.0, -big, big))


@triton.jit
def _mix32(x):
    """The 32-bit mixer of memattn._dropout (uint32 in, uint32 out, wrapping products)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _dropout_row_hash(bh, seed, q_idx):
    """Per-query part of the keep hash: mix(mix(bh ^ seed) ^ q_idx), uint32 [BM]."""
    x_bh = _mix32((bh ^ seed).to(tl.uint32))
    return _mix32(x_bh ^ q_idx.to(tl.uint32))


@triton.jit
def _dropout_keep(x_row, k_idx, drop_thr):
    """True where the pair is kept: (mix(x_row ^ k_idx) >> 8) >= ceil(p * 2**24)."""
    x = _mix32(x_row ^ k_idx.to(tl.uint32))
    return (x >> 8) >= drop_thr


@triton.jit
def _pair_mask(qi, kj, Nq, Nk, L, R, doc_q, doc_k, bits_ptr, bit_r, bit_c,
               HAS_DOCS: tl.constexpr, MAP_BN: tl.constexpr):
    """Allowed pairs of a masked tile on the block-map path. qi / kj: query / key indices
    broadcasting to the tile shape; bit_r / bit_c: the same pairs' row / column inside their
    map tile. HAS_DOCS: band-and-globals (Longformer, global tokens), where the band [L, R]
    and the global flags doc_q / doc_k decide instead of a bit tile."""
    ok = (qi < Nq) & (kj < Nk)
    if HAS_DOCS:
        d = qi + (Nk - Nq) - kj
        ok = ok & (((d <= L) & (d >= -R)) | (doc_q != 0) | (doc_k != 0))
    else:
        w = tl.load(bits_ptr + (bit_r >> 5) * MAP_BN + bit_c)
        ok = ok & (((w >> (bit_r & 31)) & 1) != 0)
    return ok


@triton.jit
def _grid_pos(pid, num_m, BH, hgroup):
    """(batch*head, query block) of grid position pid. Heads go in groups of ``hgroup``; inside
    a group the query blocks run last block first, across the group's heads (causal: the
    longest rows of the group start together, the shortest end it), and the group's K/V
    stay in L2. hgroup = 1: one head after another, each last block first (Triton specialises
    an integer argument equal to 1 as a constant, so that case compiles to the plain mapping)."""
    if hgroup == 1:
        bh = pid // num_m
        m = num_m - 1 - pid % num_m
    else:
        per = hgroup * num_m
        grp = pid // per
        r = pid - grp * per
        gh = tl.minimum(hgroup, BH - grp * hgroup)            # the last group may be short
        bh = grp * hgroup + r % gh
        m = num_m - 1 - r // gh
    return bh, m


@triton.jit
def _window_mask(qi, kj, Nq, Nk, L, R):
    """Parametric path without documents: pairs inside the keys and the window q - L <= k <= q + R
    (qi / kj broadcast to the tile's shape; L, R scalars, no registers held across the loop)."""
    ok = (qi < Nq) & (kj < Nk)
    d = qi + (Nk - Nq) - kj                        # q_pos - kv_pos
    return ok & (d <= L) & (d >= -R)


@triton.jit
def _row_bounds(qi, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS: tl.constexpr):
    """Parametric path, query rows qi [BM]: what the masked tiles of the forward / dQ loops
    compare against. Without documents the window scalars (L, R) (see _window_mask). With
    documents each row's allowed keys as one inclusive range [lo, hi], [BM, 1] each (the
    window, the keys and the row's document; hi = -1 past Nq), loaded once per program: a
    masked tile then costs two comparisons per pair and no loads of the keys' document ids
    (documents are contiguous, so "same document" is a key range)."""
    if HAS_DOCS:
        qpos = qi + (Nk - Nq)
        lo = tl.maximum(qpos - L, 0)
        hi = tl.minimum(qpos + R, Nk - 1)
        d = tl.load(DOC_ID + (tl.minimum(qi, Nq - 1) + (Nk - Nq) - doc_pmin))
        lo = tl.maximum(lo, tl.load(DOC_RANGE + 2 * d))
        hi = tl.minimum(hi, tl.load(DOC_RANGE + 2 * d + 1) - 1)
        return lo[:, None], tl.where(qi < Nq, hi, -1)[:, None]
    else:
        return L, R


@triton.jit
def _col_bounds(kj, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin, HAS_DOCS: tl.constexpr):
    """Parametric path, key columns kj [BN]: the transpose of :func:`_row_bounds` for the dK/dV
    loop. Without documents (L, R); with documents each key's allowed query rows [lo, hi],
    [BN, 1] each (hi = -1 past Nk)."""
    if HAS_DOCS:
        off = Nk - Nq
        lo = tl.maximum(kj - R - off, 0)
        hi = tl.minimum(kj + L - off, Nq - 1)
        d = tl.load(DOC_ID + (tl.minimum(kj, Nk - 1) - doc_pmin))
        lo = tl.maximum(lo, tl.load(DOC_RANGE + 2 * d) - off)
        hi = tl.minimum(hi, tl.load(DOC_RANGE + 2 * d + 1) - 1 - off)
        return lo[:, None], tl.where(kj < Nk, hi, -1)[:, None]
    else:
        return L, R


@triton.jit
def _row_tile_mask(qi, kj, Nq, Nk, lo, hi, doc_q, DOC_ID, doc_pmin, bits_ptr, bit_r, bit_c,
                   HAS_MAP: tl.constexpr, HAS_DOCS: tl.constexpr, MAP_BN: tl.constexpr):
    """Allowed pairs of a masked [BM, BN] tile of the forward / dQ loops: query rows qi [BM],
    keys kj [BN]; lo, hi from :func:`_row_bounds` on the parametric path, the band on the
    block-map path (with doc_q the rows' global flags, or the bit tile at bits_ptr)."""
    if HAS_MAP:
        doc_k = doc_q
        if HAS_DOCS:
            doc_k = tl.load(DOC_ID + (kj - doc_pmin), mask=kj < Nk, other=-1)[None, :]
        return _pair_mask(qi[:, None], kj[None, :], Nq, Nk, lo, hi, doc_q, doc_k, bits_ptr,
                          bit_r[:, None], bit_c[None, :], HAS_DOCS, MAP_BN)
    elif HAS_DOCS:
        return (kj[None, :] >= lo) & (kj[None, :] <= hi)
    else:
        return _window_mask(qi[:, None], kj[None, :], Nq, Nk, lo, hi)


@triton.jit
def _kv_block_range(m0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Key blocks of query rows [m0, m0 + BLOCK_M): [lo, flo) and [fhi, hi) need the predicate,
    [flo, fhi) are allowed for every row and inside the keys. hopper._key_blocks is its Gluon
    twin (a gluon.jit kernel cannot call a triton.jit helper): change both together."""
    m_last = tl.minimum(m0 + BLOCK_M, Nq) - 1
    q_first = m0 + (Nk - Nq)
    q_last = m_last + (Nk - Nq)
    lo = tl.maximum(q_first - L, 0)
    hi = tl.minimum(q_last + R + 1, Nk)
    flo = tl.maximum(q_last - L, 0)
    fhi = tl.minimum(q_first + R + 1, Nk)
    if HAS_DOCS:
        d_first = tl.load(DOC_ID + (q_first - doc_pmin))
        d_last = tl.load(DOC_ID + (q_last - doc_pmin))
        lo = tl.maximum(lo, tl.load(DOC_RANGE + 2 * d_first))
        hi = tl.minimum(hi, tl.load(DOC_RANGE + 2 * d_last + 1))
        flo = tl.maximum(flo, tl.load(DOC_RANGE + 2 * d_last))
        fhi = tl.minimum(fhi, tl.load(DOC_RANGE + 2 * d_first + 1))
    return _blocks_of(lo, hi, flo, fhi, BLOCK_N)


@triton.jit
def _q_block_range(n0, Nq, Nk, L, R, DOC_ID, DOC_RANGE, doc_pmin,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Query blocks (of BLOCK_M) that keys [n0, n0 + BLOCK_N) must visit, split as in
    _kv_block_range: query positions allowed for key j are [j - R, j + L]. The Gluon dK/dV kernel
    (hopper._attn_bwd_dkdv_hopper) inlines the same computation: change both together."""
    n_last = tl.minimum(n0 + BLOCK_N, Nk) - 1
    lo = n0 - R
    hi = n_last + L + 1
    flo = n_last - R
    fhi = n0 + L + 1
    if HAS_DOCS:
        d_first = tl.load(DOC_ID + (n0 - doc_pmin))
        d_last = tl.load(DOC_ID + (n_last - doc_pmin))
        lo = tl.maximum(lo, tl.load(DOC_RANGE + 2 * d_first))
        hi = tl.minimum(hi, tl.load(DOC_RANGE + 2 * d_last + 1))
        flo = tl.maximum(flo, tl.load(DOC_RANGE + 2 * d_last))
        fhi = tl.minimum(fhi, tl.load(DOC_RANGE + 2 * d_first + 1))
    off = Nk - Nq
    lo = tl.maximum(lo - off, 0)
    hi = tl.minimum(hi - off, Nq)
    flo = tl.maximum(flo - off, 0)
    fhi = tl.minimum(fhi - off, Nq)
    return _blocks_of(lo, hi, flo, fhi, BLOCK_M)


@triton.jit
def _blocks_of(lo, hi, flo, fhi, BLOCK: tl.constexpr):
    """Index ranges [lo, hi) (all) and [flo, fhi) (no predicate), lo/flo >= 0, to block
    ranges lo_b <= flo_b <= fhi_b <= hi_b: blocks [flo_b, fhi_b) lie wholly in [flo, fhi)."""
    hi = tl.maximum(hi, lo)
    fhi = tl.maximum(fhi, flo)
    lo_b = lo // BLOCK
    hi_b = tl.where(hi > lo, (hi + BLOCK - 1) // BLOCK, lo_b)
    flo_b = (flo + BLOCK - 1) // BLOCK
    fhi_b = fhi // BLOCK
    flo_b = tl.minimum(tl.maximum(flo_b, lo_b), hi_b)
    fhi_b = tl.minimum(tl.maximum(fhi_b, flo_b), hi_b)
    return lo_b, flo_b, fhi_b, hi_b


@triton.jit
def _rows(idx, I64: tl.constexpr):
    """[N] row indices -> [N, 1] row offsets factor, int64 only when offsets may pass 2**31
    (int32 address arithmetic keeps the per-tile address tensors in half the registers)."""
    if I64:
        r = idx.to(tl.int64)[:, None]
    else:
        r = idx[:, None]
    return r


@triton.jit
def _tile_mask(rows_ok, dmask, EVEN_D: tl.constexpr):
    """[N, BD] mask of a tile of rows: the rows alone when the head dim fills its block
    (a mask constant along the contiguous dim lets loads and stores use 16-byte vectors; with
    the column mask, whose head dim is not specialised, they were 2-byte ones), else rows
    and columns."""
    if EVEN_D:
        m = rows_ok[:, None]
    else:
        m = rows_ok[:, None] & dmask[None, :]
    return m


@triton.jit
def _load_rows(base, desc, b, h, row0, rows_idx, n_rows, stride_n, stride_d, offs_d, dmask,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, I64: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK, BLOCK_D] tile of rows row0 .. row0 + BLOCK of one (batch, head), zero beyond
    ``n_rows`` and the head dim: a TMA load through a (B, H, N, D) descriptor, or pointers."""
    if USE_TMA:
        t = desc.load([b, h, row0, 0]).reshape(BLOCK, BLOCK_D)
    else:
        ptrs = base + _rows(rows_idx, I64) * stride_n + offs_d[None, :] * stride_d
        if MASKED and EVEN_D:
            # a row-only mask keeps 16-byte vectors, so the loop can still use cp.async
            t = tl.load(ptrs, mask=(rows_idx < n_rows)[:, None], other=0.0)
        elif MASKED:
            t = tl.load(ptrs, mask=(rows_idx < n_rows)[:, None] & dmask[None, :], other=0.0)
        elif EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    return t
