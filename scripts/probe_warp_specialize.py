"""Does Triton warp-specialise an attention loop for sm_90? (compile-only, no GPU needed)

    .venv/bin/python scripts/probe_warp_specialize.py

Compiles one online-softmax loop (BM 128, BN 64, D 128, 8 warps, 3 stages, bf16) for a
Hopper target twice, with ``tl.range(..., warp_specialize=False / True)``, and prints the
PTX size, its hash, the number of ``wgmma.mma_async`` and whether ``setmaxnreg`` (the
register split of producer and consumer warps) appears. Identical PTX means the option had
no effect for this target (Triton 3.6: identical; benchmarks/NOTES.md, session 5).
"""

from __future__ import annotations

import hashlib

import torch
import triton
import triton.language as tl

from gpu_triton import use_sm90_target   # scripts/ is on the path when this file runs


@triton.jit
def _loop(Q, K, V, O, N, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    acc = tl.zeros([BM, D], tl.float32)
    m_i = tl.full([BM], -float("inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for s in tl.range(0, N, BN, warp_specialize=WS):
        offs_n = s + tl.arange(0, BN)
        k = tl.load(K + offs_n[:, None] * D + offs_d[None, :])
        v = tl.load(V + offs_n[:, None] * D + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
        m_i = m_new
    tl.store(O + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(tl.bfloat16))


def main() -> int:
    use_sm90_target()
    x = torch.empty(1024, 128, dtype=torch.bfloat16)
    ptx = {}
    for ws in (False, True):
        c = _loop.warmup(x, x, x, x, 1024, BM=128, BN=64, D=128, WS=ws, grid=(8,), num_warps=8, num_stages=3)
        ptx[ws] = c.asm["ptx"]
        print(f"warp_specialize={ws}: PTX {len(ptx[ws])} chars, md5 {hashlib.md5(ptx[ws].encode()).hexdigest()[:12]}, "
              f"wgmma {ptx[ws].count('wgmma.mma_async')}, setmaxnreg {'setmaxnreg' in ptx[ws]}")
    print("identical PTX: the option has no effect for sm_90" if ptx[False] == ptx[True]
          else "different PTX: the option changes the sm_90 code")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
