"""Decoding: the merge of the split-KV forward's partial results.

When a forward's grid would not fill the GPU (decoding: one query block per head), the
launcher (:func:`.launch.kv_splits`) gives each (head, query block) several programs of the
forward kernel (``SPLIT`` in :mod:`.forward`), each over a contiguous share of the key
blocks, writing float32 partial outputs and lse; this kernel merges them exactly.
Launched by :mod:`.launch` only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _tile_mask


@triton.jit(do_not_specialize=["n_split", "R", "Hq", "Nq", "HEAD_DV"])
def _split_merge_kernel(
        OP, LP, Out, Lse,            # float32 partials (split, R, Dv) and (split, R); out (B, Hq, Nq, Dv), lse (R,)
        sob, soh, son, sod,
        n_split, R, Hq, Nq, HEAD_DV,
        BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr):
    # The split-KV merge: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s over
    # the R = B * Hq * Nq rows (a row without any key keeps out 0, lse -inf).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DV)
    rmask = rows < R
    m2 = _tile_mask(rmask, offs_d < HEAD_DV, EVEN_D)
    r64 = rows.to(tl.int64)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(n_split):
        m = tl.maximum(m, tl.load(LP + s * R + r64, mask=rmask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    tot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(n_split):
        w = tl.exp(tl.load(LP + s * R + r64, mask=rmask, other=float("-inf")) - m_safe)
        o = tl.load(OP + (s * R + r64)[:, None] * HEAD_DV + offs_d[None, :], mask=m2, other=0.0)
        acc += w[:, None] * o
        tot += w
    has = tot > 0.0
    out = acc / tl.where(has, tot, 1.0)[:, None]
    b = rows // (Hq * Nq)
    h = (rows // Nq) % Hq
    n = rows % Nq
    o_ptrs = (Out + b.to(tl.int64)[:, None] * sob + h.to(tl.int64)[:, None] * soh + n.to(tl.int64)[:, None] * son
              + offs_d[None, :] * sod)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m2)
    tl.store(Lse + r64, tl.where(has, m_safe + tl.log(tl.where(has, tot, 1.0)), float("-inf")), mask=rmask)
