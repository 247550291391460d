"""Session 12 probe (one H200): is memattn's causal fwd+bwd at H = 8 (what each Ulysses rank runs at
64k on two GPUs) half the time of H = 16, and what does the permute-reshape copy of one 128-MB
shard cost? Run: PYTHONPATH=$PWD python3 benchmarks/experiments/ulysses_heads_probe.py"""
import torch, time, memattn
def t(H, reps=5):
    q, k, v, do = (torch.randn(1, H, 65536, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(True)
    def step():
        memattn.attention(q, k, v, causal=True).backward(do)
        q.grad = k.grad = v.grad = None
    step(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t0 = time.perf_counter(); step(); torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[reps // 2], ts
for H in (16, 8, 16, 8):
    print("H", H, "fwd+bwd ms (median, all)", t(H))
x = torch.randn(2, 1, 8, 32768, 128, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10):
        y = x.permute(1, 2, 0, 3, 4).reshape(1, 8, 65536, 128)
    torch.cuda.synchronize(); print("permute-reshape copy of a 128 MB shard, ms", (time.perf_counter() - t0) / 10 * 1e3)
