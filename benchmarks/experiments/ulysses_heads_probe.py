"""Session 12 probe (one H200): does memattn's causal forward+backward at H = 8 (what each
Ulysses rank runs at 64k on two GPUs) take half the time of H = 16, and what does the
permute-and-reshape copy of one 128-MB shard cost? Results: benchmarks/NOTES.md, session 12.

    PYTHONPATH=$PWD python3 benchmarks/experiments/ulysses_heads_probe.py
"""

from __future__ import annotations

import time

import torch

import memattn


def fwd_bwd_ms(heads: int, n: int = 65536, d: int = 128, reps: int = 5) -> tuple[float, list[float]]:
    """(median, every reading) ms of one causal bf16 forward+backward, B = 1, after a warm-up."""
    q, k, v, do = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)

    def step() -> None:
        memattn.attention(q, k, v, causal=True).backward(do)
        q.grad = k.grad = v.grad = None

    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[reps // 2], times


def layout_copy_ms(calls: int = 10) -> float:
    """ms of Ulysses' (W, B, H/W, n, D) -> (B, H/W, W·n, D) copy for W = 2, 8 heads, 32k rows each."""
    x = torch.randn(2, 1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        x.permute(1, 2, 0, 3, 4).reshape(1, 8, 65536, 128)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    for heads in (16, 8, 16, 8):
        print("H", heads, "fwd+bwd ms (median, all)", fwd_bwd_ms(heads))
    for _ in range(3):
        print("permute-reshape copy of a 128 MB shard, ms", layout_copy_ms())


if __name__ == "__main__":
    main()
