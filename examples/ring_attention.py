"""Ring and Ulysses attention across processes, checked against one process.

Run with torchrun (CPU and gloo by default; NCCL when CUDA is available):

    torchrun --standalone --nproc_per_node=2 examples/ring_attention.py
    torchrun --standalone --nproc_per_node=2 examples/ring_attention.py --seq-len 4096 --heads 8

Every rank builds the same full q, k, v (same seed), keeps its shard, runs causal ring
attention (zigzag layout) and Ulysses attention forward and backward, and compares its
output rows and gradients with ``memattn.attention`` on the whole sequence.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import memattn
from memattn.distributed import ring_attention, shard, ulysses_attention, unshard


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512, help="global sequence length N")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=60.0, help="process-group timeout, seconds")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    # float32 on CPU: absolute 1e-5; bfloat16 on GPUs: 2e-2 of each tensor's largest magnitude
    tol, relative = (2e-2, True) if cuda else (1e-5, False)

    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 1, args.heads, args.seq_len, args.head_dim
    q, k, v, g = (torch.randn(B, H, N, D, generator=gen).to(device, dtype) for _ in range(4))

    # the whole sequence in one process
    qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = memattn.attention(qf, kf, vf, causal=True)
    (out * g).sum().backward()

    ok = True
    for name, layout, fn in (("ring attention (zigzag, causal)", "zigzag", ring_attention),
                             ("ulysses attention (causal)", "contiguous", ulysses_attention)):
        ql, kl, vl = (shard(t, 2, layout).detach().clone().requires_grad_(True) for t in (q, k, v))
        kwargs = {"layout": layout, "causal": True}
        ol = fn(ql, kl, vl, **kwargs)
        (ol * shard(g, 2, layout)).sum().backward()
        def err(got: torch.Tensor, want: torch.Tensor) -> float:
            e = (got.float() - want.float()).abs().max().item()
            return e / max(want.float().abs().max().item(), 1e-30) if relative else e

        errs = {"out": err(unshard(ol.detach(), 2, layout), out.detach())}
        for gname, local, full in (("dq", ql.grad, qf.grad), ("dk", kl.grad, kf.grad), ("dv", vl.grad, vf.grad)):
            errs[gname] = err(local, shard(full, 2, layout))
        worst = torch.tensor(max(errs.values()), device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        good = worst.item() <= tol
        ok &= good
        if rank == 0:
            detail = ", ".join(f"{key} {val:.2e}" for key, val in errs.items())
            kind = "relative" if relative else "absolute"
            print(f"{name}: {'OK' if good else 'MISMATCH'} (world {world}, N {N}, {dtype}, max {kind} error over "
                  f"ranks {worst.item():.2e}; rank 0: {detail})", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
