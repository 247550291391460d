"""Per-kernel GPU time of one forward+backward, memattn against FlexAttention (same run).

    PYTHONPATH=$PWD:$PWD/tests python3 scripts/gpu_profile.py --out $OUT [--cases window1024,causal4k]

Why: the timing tables give one number per call; where memattn's backward loses to Flex's
(windows, documents, 4k) needs the split between the kernels of each library. For every
case, both libraries run a warm forward+backward, then ``--iters`` more under
``torch.profiler``; device time is summed per kernel name and divided by the iterations.
Writes ``$OUT/profile.json`` and prints a table per case (µs per forward+backward).

With ``--ncu`` each library's warm forward+backward runs once between
``cudaProfilerStart`` / ``cudaProfilerStop`` instead, for Nsight Compute::

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \
        python3 scripts/gpu_profile.py --out $OUT --ncu --cases full1k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CASES = {  # name: (mask kind of gpu_triton.flex_setup, B, H, N, D)
    "window1024": ("window1024", 1, 16, 65536, 128),
    "documents16": ("documents16_causal", 1, 16, 65536, 128),
    "causal4k": ("causal", 4, 16, 4096, 128),
    "full1k": ("full", 16, 16, 1024, 128),
    "causal1k": ("causal", 16, 16, 1024, 128),
}


def kernel_times(fn, iters: int) -> dict[str, float]:
    """Device microseconds per call of ``fn``, by kernel name (profiler's CUDA events)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.name] = out.get(ev.name, 0.0) + ev.device_time_total / iters
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def gaps(fn, leaves, trace_path) -> dict:
    """Where a timed forward+backward spends time outside kernels: do_bench medians (ms) with
    and without resetting the gradients, then one call traced after an L2 flush with the
    gradients reset (as ``do_bench(..., grad_to_none=...)`` runs it): kernel time, the span
    from the first kernel's start to the last one's end, and the CUDA runtime calls (µs)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    out = {"bench_gtn_ms": do_bench(fn, warmup=10, rep=40, grad_to_none=list(leaves), return_mode="median"),
           "bench_acc_ms": do_bench(fn, warmup=10, rep=40, return_mode="median")}
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    for t in leaves:
        t.grad = None
    fn()
    torch.cuda.synchronize()
    for t in leaves:
        t.grad = None
    flush.zero_()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    kern, runtime = [], {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kern.append((ev.time_range.start, ev.time_range.end, ev.name))
        elif ev.name.startswith(("cuda", "cu")) and not ev.name.startswith("cudaGetDevice"):
            runtime[ev.name] = runtime.get(ev.name, 0.0) + ev.cpu_time_total
    kern.sort()
    busy = sum(e - s for s, e, _ in kern)
    out.update(kernels=len(kern), kernel_us=busy, span_us=kern[-1][1] - kern[0][0] if kern else 0.0,
               idle_us=(kern[-1][1] - kern[0][0] - busy) if kern else 0.0,
               gaps_us=[round(kern[i + 1][0] - kern[i][1], 1) for i in range(len(kern) - 1)],
               kernel_names=[n[:40] for _, _, n in kern],
               runtime_us={k: round(v, 1) for k, v in sorted(runtime.items(), key=lambda kv: -kv[1])[:8]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, among " + ",".join(CASES))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ncu", action="store_true", help="one profiled forward+backward per library (Nsight Compute)")
    ap.add_argument("--gaps", action="store_true",
                    help="do_bench with and without grad_to_none, and one traced forward+backward after an L2 "
                         "flush (as do_bench runs it): GPU idle time inside it and the runtime calls")
    a = ap.parse_args(argv)
    import torch
    import memattn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_triton as gt

    a.out.mkdir(parents=True, exist_ok=True)
    res = {"env": {"torch": torch.__version__, "device": torch.cuda.get_device_name()}, "cases": {}}
    for name in a.cases.split(","):
        kind, B, H, N, D = CASES[name]
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        _, pat = gt.flex_setup(kind, N, H, D, "cuda")

        def mem_fb():
            memattn.attention(q, k, v, pattern=pat, backend="triton").backward(do)

        _, flex_fb, _ = gt._flex_fns(kind, q, k, v, do, N, "cuda")
        row = {}
        for impl, fb in (("memattn", mem_fb), ("flex", flex_fb)):
            for t in (q, k, v):
                t.grad = None
            if a.gaps:
                row[impl] = gaps(fb, (q, k, v), a.out / f"trace_{name}_{impl}.json")
                continue
            if a.ncu:
                fb()
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
                fb()
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
                row[impl] = {}
            else:
                row[impl] = kernel_times(fb, a.iters)
        res["cases"][name] = {"B": B, "H": H, "N": N, "D": D, "kind": kind, **row}
        print(f"-- {name} (B={B} H={H} N={N} D={D}), µs per forward+backward")
        if a.gaps:
            for impl in ("memattn", "flex"):
                print(f"  {impl}: {json.dumps(row[impl])}")
            (a.out / "gaps.json").write_text(json.dumps(res, indent=1))
            continue
        for impl in ("memattn", "flex"):
            total = sum(row[impl].values())
            print(f"  {impl}: total {total:.0f}")
            for kname, us in list(row[impl].items())[:6]:
                print(f"    {us:9.1f}  {kname[:90]}")
        (a.out / "profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
