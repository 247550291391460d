"""Host (CPU) time of one memattn forward+backward on the GPU, and where it goes.

    PYTHONPATH=$PWD:$PWD/tests python3 scripts/gpu_host.py [--n 1024] [--d 128] [--calls 200]
    PYTHONPATH=$PWD:$PWD/tests python3 scripts/gpu_host.py --decode 1,32,32,8192 [--d 128]

Why: at short sequences a forward+backward's GPU time (~0.85 ms at 1k causal, D = 128) is
close to the time Python takes to enqueue it, so ``do_bench`` can measure the host. The
device is kept busy by a long sleep kernel while the calls are enqueued, so the wall time
is pure host time; then cProfile runs the same calls and prints the functions that cost most.
With ``--decode B,H,Hkv,N`` the call is one decoding step (one query per sequence, no
gradient), and the device time per call (back to back, events) and per kernel
(``torch.profiler``) are printed too.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time


def _floor_fn(q, k, v, do):
    """A forward+backward through a bare autograd.Function that allocates what memattn's
    two-pass path allocates (out, lse; dq, dk, dv and the float32 delta / lse2 rows) and
    launches nothing: what the framework alone costs the host."""
    import torch

    class _Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            torch.empty((2, q.shape[0] * q.shape[1], q.shape[2]), dtype=torch.float32, device=q.device)
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def fb():
        for t in (q, k, v):
            t.grad = None
        _Bare.apply(q, k, v).backward(do)

    return fb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--decode", default="", help="B,H,Hkv,N: time a decoding step instead")
    ap.add_argument("--floor", action="store_true",
                    help="also time a bare autograd.Function with memattn's allocations and no kernel "
                         "(the framework's share of the host time)")
    a = ap.parse_args(argv)
    import torch
    import memattn
    from memattn import patterns

    if a.decode:                  # one decoding step: one query per sequence, no gradient
        Bd, Hd, Hkv, Nd = (int(x) for x in a.decode.split(","))
        q = torch.randn(Bd, Hd, 1, a.d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(Bd, Hkv, Nd, a.d, device="cuda", dtype=torch.bfloat16) for _ in range(2))

        def fwd():
            return memattn.attention(q, k, v, backend="triton")

        fb = fwd
    else:                         # a training step at B * N = 16384, hidden 2048, causal
        B, H = 16384 // a.n, 2048 // a.d
        q, k, v = (torch.randn(B, H, a.n, a.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        pat = patterns.causal()

        def fwd():
            return memattn.attention(q, k, v, pattern=pat, backend="triton")

        def fb():
            for t in (q, k, v):
                t.grad = None
            fwd().backward(do)

    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    if a.decode:
        from torch.profiler import ProfilerActivity, profile

        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(a.calls):
            fb()
        e1.record()
        torch.cuda.synchronize()
        print(f"device+host ms per call, back to back: {e0.elapsed_time(e1) / a.calls:.4f}")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fb()
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                print(f"  kernel {ev.key[:60]}: {ev.device_time_total / 20:.1f} us per call, {ev.count // 20} launches")

    def host(fn) -> float:
        torch.cuda._sleep(2 * 10 ** 9)        # ~1 s of device work: enqueuing never waits for it
        t0 = time.perf_counter()
        for _ in range(a.calls):
            fn()
        dt = (time.perf_counter() - t0) / a.calls * 1e3
        torch.cuda.synchronize()
        return dt

    if a.decode:
        print(f"host ms per decoding step: {host(fb):.4f}")
    else:
        print(f"host ms per call: forward {host(fwd):.4f}  forward+backward {host(fb):.4f}")
        if a.floor:
            floor_fb = _floor_fn(q, k, v, do)
            floor_fb()
            print(f"host ms per call, bare autograd.Function (same allocations, no kernel): "
                  f"forward+backward {host(floor_fb):.4f}")
    torch.cuda._sleep(2 * 10 ** 9)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        fb()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof).sort_stats("tottime")
    st.print_stats(a.top)
    st.sort_stats("cumulative").print_stats(a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
