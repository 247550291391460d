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

Other modes, one per run: ``--gaps`` (idle time inside one traced call), ``--flush`` (each
library back to back, after do_bench's L2 flush and after an equal idle gap, plus its host
time per call), ``--clocks`` (SM clock, power, throttle reasons from ``nvidia-smi`` and the
energy per call from NVML while each library runs back to back; ``--bwd-variants atomic``
adds memattn under another backward strategy, e.g. the one-pass atomic dQ, which does 5
matrix products where the two-pass backward does 7). ``--impls memattn`` profiles memattn
alone (A/B runs of two trees).

Why energy: with the clock held by the power cap (session 7, call 8), time per call is about
energy per call over the cap, so a kernel that does less work per call wins there even when
it takes more cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CASES = {  # name: (mask kind of gpu_triton.flex_setup, B, H, N, D)
    "window1024": ("window1024", 1, 16, 65536, 128),
    "window128k": ("window1024", 1, 16, 131072, 128),
    "documents16": ("documents16_causal", 1, 16, 65536, 128),
    "causal4k": ("causal", 4, 16, 4096, 128),
    "causal4k_b16": ("causal", 16, 16, 4096, 128),      # documents16's work as a batch
    "causal16k": ("causal", 1, 16, 16384, 128),
    "full1k": ("full", 16, 16, 1024, 128),
    "causal1k": ("causal", 16, 16, 1024, 128),
    "causal1k_d64": ("causal", 16, 32, 1024, 64),
}


def kernel_times(fn, iters: int, flush=None) -> dict[str, float]:
    """Device microseconds per call of ``fn``, by kernel name (profiler's CUDA events). With
    ``flush`` (a buffer), the buffer is zeroed before every call, as ``do_bench`` does, and
    that kernel is left out of the sum."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            if flush is not None:
                flush.zero_()
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    skip = ("elementwise_kernel", "vectorized_elementwise") if flush is not None else ()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and not any(x in ev.name for x in skip):
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


def event_times(fn, leaves, pre, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn``, timed by CUDA events, with the
    gradients of ``leaves`` reset and ``pre()`` run before each (e.g. an L2 flush)."""
    import torch

    ts = []
    for _ in range(iters):
        for t in leaves:
            t.grad = None
        pre()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return [x.elapsed_time(y) for x, y in ts]


def flush_effect(fns: dict, leaves, iters: int) -> dict:
    """Does an L2 flush before each call slow a library down? For each library, in alternating
    rounds (so clock drift hits both): the median milliseconds of ``iters`` calls timed with
    events, (a) back to back, (b) after zeroing 256 MiB (``do_bench``'s flush), (c) after a
    device sleep as long as that flush (an idle gap without touching L2); then the per-kernel
    times with the flush (``kernel_times(..., flush=...)``)."""
    import statistics

    import torch

    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(10):
        flush.zero_()
    ev1.record()
    torch.cuda.synchronize()
    flush_ms = ev0.elapsed_time(ev1) / 10
    ev0.record()
    torch.cuda._sleep(10 ** 6)                    # calibrate: cycles per millisecond
    ev1.record()
    torch.cuda.synchronize()
    cycles = int(flush_ms * 10 ** 6 / ev0.elapsed_time(ev1))

    def timed(fn, pre) -> float:
        return statistics.median(event_times(fn, leaves, pre, iters))

    pres = {"back_to_back": lambda: None, "flush": flush.zero_,
            "sleep": lambda: torch.cuda._sleep(cycles)}
    out: dict = {name: {"flush_ms": flush_ms} for name in fns}
    for name, fn in fns.items():
        fn()
        # host time per call: the device is kept busy by a long sleep, so enqueuing never waits
        torch.cuda.synchronize()
        torch.cuda._sleep(int(cycles * 200 / flush_ms))          # ~200 ms
        t0 = time.perf_counter()
        for _ in range(20):
            for t in leaves:
                t.grad = None
            fn()
        out[name]["host_ms"] = round((time.perf_counter() - t0) / 20 * 1e3, 4)
        torch.cuda.synchronize()
    for _ in range(2):
        for name, fn in fns.items():
            for mode, pre in pres.items():
                out[name].setdefault(mode, []).append(round(timed(fn, pre), 4))
    for name, fn in fns.items():
        for t in leaves:
            t.grad = None
        out[name]["kernels_flush"] = kernel_times(fn, iters // 2, flush)
        out[name]["kernels_warm"] = kernel_times(fn, iters // 2)
    return out


class _Energy:
    """The GPU's energy counter (NVML ``nvmlDeviceGetTotalEnergyConsumption``, millijoules since
    the driver loaded) through ctypes, so no Python package is needed. ``read()`` returns None
    where NVML or the counter is missing. The device is the first of CUDA_VISIBLE_DEVICES
    (NVML numbers devices ignoring that variable), else 0."""

    def __init__(self, lib: str = "libnvidia-ml.so.1") -> None:
        import ctypes

        self._h = None
        try:
            self._lib = ctypes.CDLL(lib)
            if self._lib.nvmlInit_v2() != 0:
                return
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            h = ctypes.c_void_p()
            if self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(int(first) if first.isdigit() else 0),
                                                      ctypes.byref(h)) == 0:
                self._h = h
        except OSError:
            pass

    def read(self) -> float | None:
        import ctypes

        if self._h is None:
            return None
        e = ctypes.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._h, ctypes.byref(e)) != 0:
            return None
        return float(e.value)


def forward_probe(fns: dict, iters: int) -> dict:
    """Forward alone, per library: the kernels' time (profiler), ``do_bench`` medians twice
    (as gpu_triton times a row, then again on a warm card), the kernels again after that,
    and the device allocations (cudaMalloc calls) the caching allocator made while
    ``do_bench`` ran. Reading it: a do_bench median above the kernel time with allocations
    is the allocator; above it without allocations, and with the kernels slower after, is the
    clock."""
    import torch
    from triton.testing import do_bench

    out = {}
    for impl, f in fns.items():
        if f is None:
            continue
        k0 = kernel_times(f, iters)
        a0 = torch.cuda.memory_stats().get("num_device_alloc", -1)
        b1 = do_bench(f, warmup=25, rep=100, return_mode="median")
        a1 = torch.cuda.memory_stats().get("num_device_alloc", -1)
        b2 = do_bench(f, warmup=25, rep=100, return_mode="median")
        k1 = kernel_times(f, iters)
        out[impl] = {"kernel_us": round(sum(k0.values()), 1), "bench_ms": [round(b1, 4), round(b2, 4)],
                     "kernel_us_after": round(sum(k1.values()), 1), "device_allocs_in_bench": a1 - a0,
                     "kernels": {n[:60]: round(us, 1) for n, us in list(k0.items())[:4]}}
    return out


def clocks(fns: dict, leaves=(), seconds: float = 2.0) -> dict:
    """SM clock, power and throttle reasons while each library runs back to back for about
    ``seconds`` (``nvidia-smi`` sampled every 50 ms in a subprocess), alternating twice: do
    our kernels run at lower clocks than Flex's (power or thermal limits)? Also the energy
    per call (``mj_per_call``, from NVML's counter over the whole span): under the power cap
    time per call ≈ energy per call / cap, so this is the figure to lower. The gradients of
    ``leaves`` are reset before every call, as do_bench's ``grad_to_none`` does (session 7's
    run did not: each call then also paid an accumulating add, the same for both libraries)."""
    import subprocess
    import tempfile

    import torch

    log = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,"
                            "clocks_throttle_reasons.active", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=log, stderr=subprocess.DEVNULL)
    spans: list = []
    energy = _Energy()
    try:
        time.sleep(0.5)
        for _ in range(2):
            for name, fn in fns.items():
                fn()
                torch.cuda.synchronize()
                e0 = energy.read()
                t0 = time.time()
                n = 0
                while time.time() - t0 < seconds:
                    for _ in range(5):
                        for t in leaves:
                            t.grad = None
                        fn()
                    torch.cuda.synchronize()
                    n += 5
                e1 = energy.read()
                spans.append((name, t0, time.time(), n, None if e0 is None or e1 is None else (e1 - e0) / n))
    finally:
        smi.terminate()
        smi.wait()
    import datetime as dt

    log.close()
    text = Path(log.name).read_text()
    Path(log.name).unlink()
    samples = []
    for line in text.splitlines():
        f = [x.strip() for x in line.split(",")]
        try:
            ts = dt.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((ts, float(f[1]), float(f[2]), float(f[3]), f[4]))
        except (ValueError, IndexError):
            continue
    out: dict = {}
    for name, t0, t1, n, mj in spans:
        inside = [x for x in samples if t0 + 0.2 <= x[0] <= t1]
        r = out.setdefault(name, {"ms_per_call": [], "mj_per_call": [], "sm_mhz": [], "power_w": [], "temp_c": [],
                                  "throttle": []})
        r["ms_per_call"].append(round((t1 - t0) / n * 1e3, 4))
        r["mj_per_call"].append(None if mj is None else round(mj, 3))
        if inside:
            r["sm_mhz"].append(round(sum(x[1] for x in inside) / len(inside)))
            r["power_w"].append(round(sum(x[2] for x in inside) / len(inside)))
            r["temp_c"].append(max(x[3] for x in inside))
            r["throttle"].append(sorted({x[4] for x in inside}))
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
    ap.add_argument("--impls", default="memattn,flex", help="which libraries to profile (default both)")
    ap.add_argument("--clocks", action="store_true",
                    help="SM clock, power and throttle reasons (nvidia-smi) while each library runs")
    ap.add_argument("--bwd-variants", default="",
                    help="with --clocks: also memattn under these backward strategies, comma-separated "
                         "(gpu_triton._variant syntax: atomic, atomic@0.5, two_pass, stored_ds)")
    ap.add_argument("--fwd", action="store_true",
                    help="the forward alone: kernel time, do_bench twice, device allocations (forward_probe)")
    ap.add_argument("--flush", action="store_true",
                    help="time each library back to back, after an L2 flush, and after an equal idle gap; "
                         "per-kernel times with and without the flush")
    a = ap.parse_args(argv)
    import torch
    import memattn
    from memattn.backends.triton import launch

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

        flex_t = gt._flex_fns(kind, q, k, v, do, N, "cuda") if "flex" in a.impls or a.flush or a.clocks else None
        flex_fb = flex_t[1] if flex_t is not None else None
        row = {}
        if a.clocks:
            fns = {"memattn": mem_fb, "flex": flex_fb}
            for var in filter(None, (x.strip() for x in a.bwd_variants.split(","))):
                def var_fb(mode_mem=gt._variant(var)):
                    with gt._backward_scope(*mode_mem):
                        mem_fb()
                fns[f"memattn[{var}]"] = var_fb
            row = clocks(fns, (q, k, v))
            res["cases"][name] = {"B": B, "H": H, "N": N, "D": D, "kind": kind, **row}
            print(f"-- {name}: {json.dumps(row)}")
            (a.out / "clocks.json").write_text(json.dumps(res, indent=1))
            continue
        if a.fwd:
            fwd_fns = {"memattn": lambda: memattn.attention(q, k, v, pattern=pat, backend="triton")}
            if flex_t is not None:
                fwd_fns["flex"] = flex_t[0]
            row = forward_probe(fwd_fns, a.iters)
            res["cases"][name] = {"B": B, "H": H, "N": N, "D": D, "kind": kind, **row}
            print(f"-- {name} forward: {json.dumps(row)}")
            (a.out / "forward.json").write_text(json.dumps(res, indent=1))
            continue
        if a.flush:
            row = flush_effect({"memattn": mem_fb, "flex": flex_fb}, (q, k, v), max(a.iters, 20))
            res["cases"][name] = {"B": B, "H": H, "N": N, "D": D, "kind": kind, **row}
            print(f"-- {name}: ms per forward+backward (two rounds each)")
            for impl in row:
                r = row[impl]
                print(f"  {impl}: back-to-back {r['back_to_back']}  flush {r['flush']}  sleep {r['sleep']}  "
                      f"host {r['host_ms']} ms/call")
                for kname, us in list(r["kernels_flush"].items())[:5]:
                    warm = r["kernels_warm"].get(kname, float("nan"))
                    print(f"    {us:9.1f} flushed / {warm:9.1f} warm  {kname[:60]}")
            (a.out / "flush.json").write_text(json.dumps(res, indent=1))
            continue
        for impl, fb in (("memattn", mem_fb), ("flex", flex_fb)):
            if impl not in a.impls.split(","):
                continue
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
        for impl in row:
            total = sum(row[impl].values())
            print(f"  {impl}: total {total:.0f}")
            for kname, us in list(row[impl].items())[:6]:
                print(f"    {us:9.1f}  {kname[:90]}")
        (a.out / "profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
