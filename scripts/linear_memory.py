"""Peak memory of causal linear attention (forward + backward) on the CPU, in a fresh process.

    .venv/bin/python scripts/linear_memory.py [--n 65536] [--heads 8] [--dim 64] [--threads 1] [--json out.json]

The measurement runs in a child process: after a small warm-up it records the resident set
size, allocates q, k, v (B=1, H, N, D, float32), runs ``linear_attention(causal=True)`` and
the backward with a random output gradient, and reports the peak RSS growth
(``ru_maxrss`` − RSS before allocating) against the bytes of q, k, v, the output and their
four gradients (8 tensors of N·H·D float32). The criterion is growth <= 2× those bytes.
Afterwards (not counted) it checks the output against a float64 step-by-step recurrence
over all N positions, and, at N = 2048, the output and gradients against the explicit
O(N²) masked sum. MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MiB = 2 ** 20


def child(n: int, heads: int, dim: int, threads: int, chunk: int | None) -> dict:
    import resource

    import psutil
    import torch

    from memattn.approx import linear_attention

    torch.set_num_threads(threads)
    proc = psutil.Process()
    # warm-up: load every code path on a small problem
    w = [torch.randn(1, heads, 256, dim, requires_grad=True) for _ in range(3)]
    linear_attention(*w, causal=True, chunk_size=chunk).sum().backward()
    del w
    rss0 = proc.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, heads, n, dim, generator=g)
    t0 = time.perf_counter()
    out = linear_attention(q, k, v, causal=True, chunk_size=chunk)
    t1 = time.perf_counter()
    out.backward(dout)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tensor_bytes = 8 * n * heads * dim * 4
    growth = peak - rss0
    result = {
        "n": n, "heads": heads, "dim": dim, "threads": threads, "chunk": chunk or "default",
        "forward_s": t1 - t0, "backward_s": t2 - t1,
        "rss_before_MiB": rss0 / MiB, "peak_before_MiB": peak_before / MiB, "peak_MiB": peak / MiB,
        "growth_MiB": growth / MiB, "tensors_MiB": tensor_bytes / MiB, "ratio": growth / tensor_bytes,
        "naive_scores_MiB": n * n * heads * 4 / MiB,
    }
    # ---- correctness (after the measurement; not counted)
    with torch.no_grad():
        phi = lambda x: torch.nn.functional.elu(x) + 1.0       # noqa: E731
        pq, pk, vv = phi(q.double())[0], phi(k.double())[0], v.double()[0]      # (H, N, ·)
        S = torch.zeros(heads, dim, dim, dtype=torch.float64)
        z = torch.zeros(heads, dim, dtype=torch.float64)
        ref = torch.empty(heads, n, dim, dtype=torch.float64)
        for t in range(n):
            S += pk[:, t, :, None] * vv[:, t, None, :]
            z += pk[:, t]
            ref[:, t] = torch.einsum("hf,hfd->hd", pq[:, t], S) / ((pq[:, t] * z).sum(-1, keepdim=True) + 1e-6)
        result["recurrence_rel_err"] = float((out[0].double() - ref).abs().max() / ref.abs().max())
    m = 2048
    qs, ks, vs = (t[:, :, :m].detach().clone().requires_grad_() for t in (q, k, v))
    o = linear_attention(qs, ks, vs, causal=True, chunk_size=chunk)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (qs, ks, vs))
    a = torch.tril(phi(q64) @ phi(k64).transpose(-1, -2))
    r = (a @ v64) / (a.sum(-1, keepdim=True) + 1e-6)
    gsm = torch.randn(o.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(o, (qs, ks, vs), gsm.float())
    want = torch.autograd.grad(r, (q64, k64, v64), gsm)
    result["n2048_out_rel_err"] = float((o.double() - r).abs().max() / r.abs().max())
    result["n2048_grad_rel_err"] = max(float((x.double() - y).abs().max() / y.abs().max()) for x, y in zip(got, want))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.heads, args.dim, args.threads, args.chunk)))
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--n", str(args.n), "--heads", str(args.heads),
           "--dim", str(args.dim), "--threads", str(args.threads)] + (["--chunk", str(args.chunk)] if args.chunk else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    ok = r["ratio"] <= 2.0 and r["recurrence_rel_err"] <= 1e-5 and r["n2048_grad_rel_err"] <= 1e-5
    print(f"causal linear attention (elu+1), B=1 H={r['heads']} N={r['n']} D={r['dim']} float32, "
          f"{r['threads']} thread(s), chunk {r['chunk']}")
    print(f"  forward {r['forward_s']:.2f} s, backward {r['backward_s']:.2f} s")
    print(f"  peak RSS growth {r['growth_MiB']:.0f} MiB vs q,k,v,out + 4 grads {r['tensors_MiB']:.0f} MiB: "
          f"ratio {r['ratio']:.2f} (limit 2.00); naive scores alone would be {r['naive_scores_MiB']:.0f} MiB")
    print(f"  output vs float64 step-by-step recurrence (all N): rel err {r['recurrence_rel_err']:.2e}")
    print(f"  N=2048 vs float64 masked sum: out {r['n2048_out_rel_err']:.2e}, grads {r['n2048_grad_rel_err']:.2e}")
    print("PASS" if ok else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
