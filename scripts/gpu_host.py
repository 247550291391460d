"""Host (CPU) time of one memattn forward+backward on the GPU, and where it goes.

    PYTHONPATH=$PWD:$PWD/tests python3 scripts/gpu_host.py [--n 1024] [--d 128] [--calls 200] [--floor] [--split]
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
import contextlib
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


@contextlib.contextmanager
def _raw_launch(on: bool):
    """The direct launcher's raw launches (C launcher called directly, TMA descriptors
    expanded and cached by memattn) on or off inside the block (plans rebuilt on entry and
    exit, so the next launches pick the setting up)."""
    from memattn.backends.triton import plans

    old = plans._RAW[0]
    plans._RAW[0] = on
    plans._PLANS.clear()
    try:
        yield
    finally:
        plans._RAW[0] = old
        plans._PLANS.clear()


def split_host(fwd, do, leaves, calls: int, sleep=None) -> dict:
    """Host milliseconds per call of the pieces of a forward+backward, without a profiler:
    the forward, ``Tensor.backward`` as the caller sees it, memattn's ``launch.backward``
    inside it (on the autograd engine's thread for CUDA tensors), and each backward launch
    (``launch._run_plan``, by plan name). ``sleep`` (e.g. ``torch.cuda._sleep``) holds the
    device first so that no launch waits for it. Also which threads ran the pieces.

    Returns:
        {"fwd", "backward", "launch_backward", "run_plan": {name: ms}, "backward_threads": n,
         "main_thread_runs_backward": bool}
    """
    import threading

    from memattn.backends.triton import launch

    spent: dict[str, float] = {}
    threads: set[int] = set()
    orig_bwd, orig_run = launch.backward, launch._run_plan

    def add(key: str, t0: int) -> None:
        spent[key] = spent.get(key, 0.0) + (time.perf_counter_ns() - t0) / 1e6

    def timed_bwd(*a, **kw):
        threads.add(threading.get_ident())
        t0 = time.perf_counter_ns()
        try:
            return orig_bwd(*a, **kw)
        finally:
            add("launch_backward", t0)

    def timed_run(plan, tensors, seed):
        t0 = time.perf_counter_ns()
        try:
            return orig_run(plan, tensors, seed)
        finally:
            add(f"run_plan:{plan.name}", t0)

    launch.backward, launch._run_plan = timed_bwd, timed_run
    try:
        if sleep is not None:
            sleep()
        for _ in range(calls):
            for t in leaves:
                t.grad = None
            t0 = time.perf_counter_ns()
            out = fwd()
            add("fwd", t0)
            t0 = time.perf_counter_ns()
            out.backward(do)
            add("backward", t0)
    finally:
        launch.backward, launch._run_plan = orig_bwd, orig_run
    per = {k: v / calls for k, v in spent.items()}
    return {"fwd": per.get("fwd"), "backward": per.get("backward"), "launch_backward": per.get("launch_backward"),
            "run_plan": {k.split(":", 1)[1]: v for k, v in per.items() if k.startswith("run_plan:")},
            "backward_threads": len(threads), "main_thread_runs_backward": threading.get_ident() in threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--decode", default="", help="B,H,Hkv,N: time a decoding step instead")
    ap.add_argument("--split", action="store_true",
                    help="also time the pieces of the forward+backward without a profiler (split_host): by "
                         "default, through Triton's CudaLauncher (not the raw C launcher), with the dQ "
                         "launch's TMA off, and by default again")
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
        for raw in (False, True, False, True):        # the direct launcher's raw launches, A/B
            with _raw_launch(raw):
                fb()
                torch.cuda.synchronize()
                print(f"  {'raw C launcher' if raw else 'Triton CudaLauncher'}: forward+backward {host(fb):.4f}")
        if a.split:
            from memattn.backends.triton import launch
            from memattn.backends.triton.configs import TileConfig

            def sleep():
                torch.cuda._sleep(2 * 10 ** 9)

            for label, ctx in (("default", None), ("Triton's CudaLauncher", "triton_launcher"),
                               ("dq without TMA", "no_tma"), ("default again", None)):
                if ctx == "no_tma":
                    fwd()                                     # the default dQ config, to copy
                    fwd().backward(do)
                    c = launch.last_configs()["dq"]
                    scope = launch.override_configs(dq=TileConfig(c.block_m, c.block_n, c.num_warps,
                                                                  c.num_stages, False))
                elif ctx == "triton_launcher":
                    scope = _raw_launch(False)
                else:
                    scope = _raw_launch(True)
                with scope:
                    fwd().backward(do)                        # compile / plan outside the timing
                    torch.cuda.synchronize()
                    r = split_host(fwd, do, (q, k, v), a.calls, sleep)
                    torch.cuda.synchronize()
                print(f"split ({label}), host ms per call: forward {r['fwd']:.4f}  Tensor.backward "
                      f"{r['backward']:.4f}  launch.backward {r['launch_backward']:.4f}  "
                      + "  ".join(f"{n} {ms:.4f}" for n, ms in r["run_plan"].items())
                      + f"  (backward on the main thread: {r['main_thread_runs_backward']})")
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
