#!/usr/bin/env python
"""CPU backend speed and peak memory against PyTorch SDPA, measured in the same run.

Timing: one fresh subprocess per N times every implementation on the same inputs, the
implementations alternating run by run (so a change in the machine's load hits them
alike); the forward and forward+backward figures are medians of the repeats. Memory: one
fresh subprocess per configuration measures the peak RSS growth of one forward+backward
over the RSS after creating the inputs (VmHWM reset through /proc/self/clear_refs where
allowed, else ru_maxrss minus the RSS then).

Problem (design.md §5 / the CPU anchors): float32, B=1, H=8, D=64; causal at N = 4096, 8192,
16384 for both, plus memattn with ``sliding_window(511)`` at N = 16384. The targets:

* causal N=8192 fwd+bwd: memattn / SDPA <= 1.5
* sliding_window(511) N=16384 fwd+bwd: SDPA dense causal / memattn >= 5
* peak RSS growth at N=16384 (causal fwd+bwd): memattn / SDPA <= 1.1
* memattn peak RSS growth N=16384 / N=4096 <= 4.5

Usage:
    python scripts/cpu_perf.py                      # table + benchmarks/cpu.json
    python scripts/cpu_perf.py --tiles 128x128,256x256,512x512   # also a causal N=8192 tile sweep
    python scripts/cpu_perf.py --quick              # N = 1024/2048 only (smoke test)

Units: ms (median wall time), MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Case:
    impl: str                      # "sdpa" | "memattn"
    pattern: str                   # "causal" | "sliding_window_511"
    n: int
    tiles: tuple[int, int] | None = None
    B: int = 1
    H: int = 8
    D: int = 64

    @property
    def name(self) -> str:
        t = "" if self.tiles is None else f"[{self.tiles[0]}x{self.tiles[1]}]"
        return f"{self.impl}{t} {self.pattern} N={self.n}"


@dataclass
class Row:
    case: Case
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mib: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------ in the worker
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(spec: dict) -> dict:
    import resource

    import torch

    import memattn
    from memattn import patterns as P
    from memattn.backends import cpu

    cases = [Case(**{**c, "tiles": tuple(c["tiles"]) if c["tiles"] else None}) for c in spec["cases"]]
    mode, repeats = spec["mode"], spec["repeats"]
    c0 = cases[0]
    torch.manual_seed(0)

    def make(n: int):
        q, k, v = (torch.randn(c0.B, c0.H, n, c0.D, requires_grad=True) for _ in range(3))
        return q, k, v, torch.randn(c0.B, c0.H, n, c0.D)

    def run(case: Case, q, k, v):
        if case.impl == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        pat = P.sliding_window(511) if case.pattern == "sliding_window_511" else None
        if case.tiles is not None:
            with cpu.tile_sizes(*case.tiles):
                return memattn.attention(q, k, v, pattern=pat, causal=pat is None, backend="cpu")
        return memattn.attention(q, k, v, pattern=pat, causal=pat is None, backend="cpu")

    def fwdbwd(case: Case, q, k, v, dout):
        for t in (q, k, v):
            t.grad = None
        run(case, q, k, v).backward(dout)

    # warm up thread pools and lazily initialised kernels on a small problem
    wq, wk, wv, wd = make(256)
    for case in cases:
        fwdbwd(case, wq, wk, wv, wd)
    del wq, wk, wv, wd
    q, k, v, dout = make(c0.n)
    if mode == "mem":
        base = _rss_bytes()
        reset = _reset_hwm()
        base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fwdbwd(c0, q, k, v, dout)
        if reset:
            peak = _hwm_bytes()
        else:  # ru_maxrss is a peak since start: only growth beyond the earlier peak is visible
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            base = max(base, base_maxrss)
        return {"peak_mib": (peak - base) / 2**20, "hwm_reset": reset}

    def fwd(case: Case):
        with torch.no_grad():
            run(case, q, k, v)

    # the implementations alternate (A B A B ...), so a change of load hits both alike
    out: dict[str, dict] = {c.name: {"fwd": [], "fwdbwd": []} for c in cases}
    for kind, fn in (("fwd", fwd), ("fwdbwd", lambda c: fwdbwd(c, q, k, v, dout))):
        for case in cases:
            fn(case)
        for _ in range(repeats):
            for case in cases:
                t0 = time.perf_counter()
                fn(case)
                out[case.name][kind].append(time.perf_counter() - t0)
    med = lambda ts: 1e3 * sorted(ts)[len(ts) // 2]  # noqa: E731
    return {name: {"fwd_ms": med(d["fwd"]), "fwdbwd_ms": med(d["fwdbwd"]),
                   "fwd_all_ms": [round(1e3 * t, 1) for t in d["fwd"]],
                   "fwdbwd_all_ms": [round(1e3 * t, 1) for t in d["fwdbwd"]]} for name, d in out.items()}


# ------------------------------------------------------------------------ in the driver
def _spawn(cases: list[Case], mode: str, repeats: int) -> dict:
    spec = json.dumps({"cases": [asdict(c) for c in cases], "mode": mode, "repeats": repeats})
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MEMATTN_POISON", None)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {res.returncode}: {tail[0]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cases(quick: bool, tiles: list[tuple[int, int]]) -> list[Case]:
    ns = (1024, 2048) if quick else (4096, 8192, 16384)
    cases = [Case(impl, "causal", n) for n in ns for impl in ("sdpa", "memattn")]
    cases.append(Case("memattn", "sliding_window_511", ns[-1]))
    cases += [Case("memattn", "causal", ns[1], tiles=t) for t in tiles]
    return cases


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="N = 1024, 2048 only")
    ap.add_argument("--tiles", default="", help="comma list of BQxBK for a causal tile sweep, e.g. 128x128,512x512")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "cpu.json"))
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats per case (default 5 for N<=4096, else 3)")
    ap.add_argument("--only-n", type=int, default=0, help="run only the cases of this N (ratios needing others: n/a)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",") if t]
    load0 = os.getloadavg()
    cases = [c for c in _cases(args.quick, tiles) if not args.only_n or c.n == args.only_n]
    rows = {c.name: Row(c) for c in cases}
    for n in sorted({c.n for c in cases}):
        group = [c for c in cases if c.n == n]
        reps = args.repeats or (5 if n <= 4096 else 3)
        t = _spawn(group, "time", reps)
        for c in group:
            r = rows[c.name]
            if "error" in t:
                r.error = t["error"]
                continue
            r.fwd_ms, r.fwdbwd_ms = t[c.name]["fwd_ms"], t[c.name]["fwdbwd_ms"]
            r.extra["fwd_all_ms"], r.extra["fwdbwd_all_ms"] = t[c.name]["fwd_all_ms"], t[c.name]["fwdbwd_all_ms"]
        for c in group:
            if args.no_mem or c.tiles is not None:
                continue
            m = _spawn([c], "mem", 1)
            rows[c.name].peak_mib = m.get("peak_mib")
            rows[c.name].extra["hwm_reset"] = m.get("hwm_reset")
            rows[c.name].error = rows[c.name].error or m.get("error")
        for c in group:
            row = rows[c.name]
            print(f"{c.name:42s} fwd {row.fwd_ms or float('nan'):9.1f} ms  fwd+bwd {row.fwdbwd_ms or float('nan'):9.1f} ms"
                  f"  peak {row.peak_mib if row.peak_mib is not None else float('nan'):8.1f} MiB"
                  + (f"  ERROR {row.error}" if row.error else ""), flush=True)
    rows = list(rows.values())
    load1 = os.getloadavg()

    def get(impl: str, pattern: str, n: int) -> Row | None:
        return next((r for r in rows if r.case.impl == impl and r.case.pattern == pattern and r.case.n == n
                     and r.case.tiles is None), None)

    all_ns = sorted({c.n for c in _cases(args.quick, [])})
    lo, mid, hi = all_ns[0], all_ns[1], all_ns[-1]

    def ms(r: Row | None, attr: str) -> float | None:
        return None if r is None else getattr(r, attr)

    ours8, sdpa8 = get("memattn", "causal", mid), get("sdpa", "causal", mid)
    ours16, sdpa16 = get("memattn", "causal", hi), get("sdpa", "causal", hi)
    ours4 = get("memattn", "causal", lo)
    sw = get("memattn", "sliding_window_511", hi)
    ratios = {
        f"causal_fwdbwd_N{mid}_ours_over_sdpa": _ratio(ms(ours8, "fwdbwd_ms"), ms(sdpa8, "fwdbwd_ms")),
        f"causal_fwd_N{mid}_ours_over_sdpa": _ratio(ms(ours8, "fwd_ms"), ms(sdpa8, "fwd_ms")),
        f"causal_fwdbwd_N{hi}_ours_over_sdpa": _ratio(ms(ours16, "fwdbwd_ms"), ms(sdpa16, "fwdbwd_ms")),
        f"window511_N{hi}_speedup_vs_sdpa_causal_fwdbwd": _ratio(ms(sdpa16, "fwdbwd_ms"), ms(sw, "fwdbwd_ms")),
        f"peak_N{hi}_ours_over_sdpa": _ratio(ms(ours16, "peak_mib"), ms(sdpa16, "peak_mib")),
        f"peak_ours_N{hi}_over_N{lo}": _ratio(ms(ours16, "peak_mib"), ms(ours4, "peak_mib")),
    }
    targets = {
        f"causal_fwdbwd_N{mid}_ours_over_sdpa": ("<=", 1.5),
        f"window511_N{hi}_speedup_vs_sdpa_causal_fwdbwd": (">=", 5.0),
        f"peak_N{hi}_ours_over_sdpa": ("<=", 1.1),
        f"peak_ours_N{hi}_over_N{lo}": ("<=", 4.5),
    }
    print(f"\nload average before {load0[0]:.2f}, after {load1[0]:.2f} (2 cores; others may be working)")
    for k, v in ratios.items():
        tgt = targets.get(k)
        ok = "" if tgt is None or v is None else (
            "  ok" if (v <= tgt[1] if tgt[0] == "<=" else v >= tgt[1]) else "  MISSED")
        print(f"{k:50s} {v if v is not None else float('nan'):7.3f}" + (f"  (target {tgt[0]} {tgt[1]}){ok}" if tgt else ""))
    import torch

    doc = {
        "meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_before": load0, "loadavg_after": load1,
                 "problem": "float32, B=1, H=8, D=64; causal unless noted; fwd+bwd includes allocation of grads",
                 "units": {"time": "ms, median", "peak": "MiB (2**20 B) of RSS growth over the inputs"}},
        "rows": [{"impl": r.case.impl, "pattern": r.case.pattern, "N": r.case.n, "tiles": r.case.tiles,
                  "fwd_ms": r.fwd_ms, "fwdbwd_ms": r.fwdbwd_ms, "peak_mib": r.peak_mib, "error": r.error, **r.extra}
                 for r in rows],
        "ratios": ratios,
        "targets": {k: f"{op} {val}" for k, (op, val) in targets.items()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
