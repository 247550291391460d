"""The ``memattn`` console script: ``bench``, ``memory``, ``demo`` and ``eval``.

Run ``memattn <command> --help`` for the options. Heavy imports (matplotlib, tqdm, psutil:
the ``cli`` extra) happen inside the commands, never at ``import memattn``.

Example:
    $ memattn demo --out demo_out
    $ memattn bench --device cpu --suite quick --out bench_out
    $ memattn memory --max-n --budget 2GiB
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Sequence

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A usage error found after parsing (printed as ``memattn: error: ...``, exit code 2)."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _size(text: str) -> int:
    from .bench.cases import parse_size

    try:
        return parse_size(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    from .bench.cases import DTYPES, PASSES, SUITES

    p = argparse.ArgumentParser(prog="memattn", description="memattn: measure attention's time, memory and "
                                "quality. Units: ms, MiB = 2**20 bytes, TFLOP/s = 1e12 FLOP/s.")
    sub = p.add_subparsers(dest="command", metavar="{bench,memory,demo,eval}")
    sub.required = True

    b = sub.add_parser("bench", help="time and peak memory of memattn beside its peers",
                       description="Time (median), TFLOP/s on allowed pairs, bandwidth (decoding) and peak "
                       "memory of each case, after a quick correctness check; a table, JSON, CSV and PNG "
                       "plots of time and memory against N. Suites: " +
                       "; ".join(f"{k}: {v[0]}" for k, v in SUITES.items()))
    b.add_argument("--suite", choices=sorted(SUITES), help="a named suite (default quick when no --impl)")
    b.add_argument("--impl", nargs="+", metavar="IMPL", help="implementations (instead of a suite): memattn, "
                   "naive, sdpa, sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math, flex, linear, performer, "
                   "fla-linear")
    b.add_argument("--n", nargs="+", type=_positive_int, default=[1024, 2048, 4096], metavar="N",
                   help="key lengths N (with --impl)")
    b.add_argument("--nq", type=_positive_int, help="query length (1 = decoding; default N)")
    b.add_argument("--d", type=_positive_int, default=64, help="head dim (with --impl)")
    b.add_argument("--heads", type=_positive_int, default=8, help="query heads (with --impl)")
    b.add_argument("--kv-heads", type=_positive_int, help="key/value heads for GQA (with --impl)")
    b.add_argument("--batch", type=_positive_int, default=1, help="batch (with --impl)")
    b.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal mask (with --impl)")
    b.add_argument("--pattern", help="pattern spec, e.g. sliding_window:1024 or documents:16 (with --impl)")
    b.add_argument("--dtype", choices=DTYPES, help="dtype (default float32 on cpu, bfloat16 on cuda)")
    b.add_argument("--backend", default="auto", choices=("auto", "cpu", "triton", "reference"),
                   help="memattn backend")
    b.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES), help="passes to time")
    b.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    b.add_argument("--out", default="bench_out", help="folder for bench.json, bench.csv and the plots")
    b.add_argument("--budget", type=_size, help="memory a case may use, inputs included (e.g. 8GiB); a case "
                   "over it is an OOM row. CPU default: 60%% of the available memory")
    b.add_argument("--max-seconds", type=_positive_float, default=None,
                   help="CPU: time spent repeating each pass (median of the repeats; at least one). "
                   "Default 0.4 for the quick suite, else 1.0")
    b.add_argument("--check-rows", type=_positive_int, default=32, help="query rows of the quick check")
    b.add_argument("--time-budget", type=_positive_float, default=None,
                   help="seconds for the whole run: a case predicted (from its line's previous size) to take the "
                   "run past it is skipped, with the reason in its row (default: no limit)")
    b.add_argument("--in-process", action="store_true", help="CPU: run cases in this process, not in workers")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--list", action="store_true", help="list the cases and exit")

    m = sub.add_parser("memory", help="memory by category, its exponent in N, and the largest N within a budget",
                       description="Memory of each mechanism split into inputs, outputs, saved tensors, "
                       "workspace, gradients and block map, predicted from shapes and measured (CUDA: "
                       "max_memory_allocated; CPU: peak RSS of a fresh subprocess per case, the kernel's "
                       "high-water mark reset via /proc/self/clear_refs, after malloc_trim). Peaks are "
                       "above the inputs; the exponent of peak memory against N is fitted. With --max-n, "
                       "the largest N within --budget is found by measurement: N doubles until a probe "
                       "exceeds the budget, then bisects (each probe placed where the measured peaks predict the budget "
                       "is met); each probe is a fresh subprocess whose RSS a "
                       "watchdog compares with the budget (RLIMIT_AS is not used: torch reserves far more "
                       "address space than it touches).")
    m.add_argument("--mechanisms", nargs="+", default=None, metavar="NAME",
                   help="memattn, naive, sdpa, window, linear, performer (default: memattn naive window)")
    m.add_argument("--n", nargs="+", type=_positive_int, default=[1024, 2048, 4096, 8192, 16384], metavar="N")
    m.add_argument("--heads", type=_positive_int, default=None,
                   help="heads (default 16 for the sweep; 128 for --max-n, hidden 16384: many heads keep N, "
                   "and so the O(N²) compute of each probe, small)")
    m.add_argument("--naive-heads", type=_positive_int, default=None,
                   help="heads of naive attention in the sweep (default 1, so N=16k fits: 16k² scores "
                   "are 1 GiB a head)")
    m.add_argument("--d", type=_positive_int, default=128, help="head dim")
    m.add_argument("--batch", type=_positive_int, default=1)
    m.add_argument("--window", type=_positive_int, default=512, help="window of the 'window' mechanism")
    m.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--dtype", choices=DTYPES, default="float32")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    m.add_argument("--out", default="memory_out", help="folder for memory.json and the plot")
    m.add_argument("--max-n", action="store_true", help="find the largest N within --budget instead of the sweep")
    m.add_argument("--budget", type=_size, default=None, help="e.g. 2GiB, 8GiB (required with --max-n)")
    m.add_argument("--pass", dest="passes", choices=("fwd", "fwd+bwd"), default="fwd+bwd",
                   help="--max-n: what must fit (default forward+backward)")
    m.add_argument("--start", type=_positive_int, default=256, help="--max-n: first N probed")
    m.add_argument("--tolerance", type=_positive_float, default=0.1, help="--max-n: stop when (first N over - largest N that fits) / largest N <= this")
    m.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="a short scaling run: exact memattn vs naive, SDPA, a window, linear",
                       description="Exact memattn, naive attention, torch SDPA, memattn with a causal sliding "
                       "window and linear attention for N from 1k to 16k, causal, B=1, H=4, D=64 (float32 on "
                       "the CPU); naive capped at 8k on the CPU. Prints the table, writes demo.json, demo.csv "
                       "and PNG plots into --out.")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--n", nargs="+", type=_positive_int, default=[1024, 2048, 4096, 8192, 16384], metavar="N")
    d.add_argument("--heads", type=_positive_int, default=4)
    d.add_argument("--d", type=_positive_int, default=64)
    d.add_argument("--window", type=_positive_int, default=512)
    d.add_argument("--naive-max", type=_positive_int, default=8192, help="largest N for naive attention")
    d.add_argument("--max-seconds", type=_positive_float, default=0.25, help="timing budget per pass")
    d.add_argument("--device", choices=("cpu", "cuda"), default=None)
    d.add_argument("--time-budget", type=_positive_float, default=85.0,
                   help="seconds for all cases (memattn's line first, then SDPA's, then the others by increasing "
                   "N); a case predicted to take the run past it is skipped, with the reason in its row")
    d.add_argument("--no-progress", action="store_true")

    sub.add_parser("eval", help="quality of approximations (memattn.eval)", add_help=False)
    return p


def _progress(total: int, disable: bool, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - the cli extra brings tqdm
        tqdm = None
    if tqdm is None or disable:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def set_postfix_str(self, s: str) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)


def _row_note(r: dict) -> str:
    t = r.get("fwdbwd_ms") or r.get("fwd_ms")
    return f"{r.get('label', r['impl'])} N={r['n']} {r['status']}" + (f" {t:.1f} ms" if t else "")


def _resolve_device(dev: str | None) -> str:
    import torch

    if dev is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available here")
    return dev


# ------------------------------------------------------------------------------ bench
def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench.cases import Case, suite
    from .bench.plots import fit_series, plot_scaling
    from .bench.report import format_peer_ratios, format_table, run_meta, write_csv, write_json
    from .bench.runner import RunOptions, run_cases

    device = _resolve_device(a.device)
    if a.suite and a.impl:
        raise CLIError("give either --suite or --impl, not both")
    if a.impl:
        from .bench.peers import IMPLS

        bad = [i for i in a.impl if i not in IMPLS]
        if bad:
            raise CLIError(f"--impl: unknown {bad}; choose from {sorted(IMPLS)}")
        dtype = a.dtype or ("float32" if device == "cpu" else "bfloat16")
        try:
            cases = [Case(i, n, d=a.d, heads=a.heads, kv_heads=a.kv_heads, batch=a.batch, causal=a.causal,
                          pattern=a.pattern, dtype=dtype, device=device, nq=a.nq, backend=a.backend,
                          passes=tuple(a.passes), group="custom")
                     for n in a.n for i in a.impl]
        except ValueError as e:
            raise CLIError(str(e)) from None
        name = "custom"
    else:
        name = a.suite or "quick"
        cases = suite(name, device)
        if a.backend != "auto":
            cases = [c.__class__(**{**c.to_dict(), "passes": c.passes, "backend": a.backend}) for c in cases]
    if a.list:
        for c in cases:
            print(f"{c.impl:<15} {c.mask_text:<32} {c.shape_text:<28} {c.dtype:<9} {c.device} {'/'.join(c.passes)}")
        print(f"{len(cases)} cases")
        return 0
    t0 = time.perf_counter()
    bar = _progress(len(cases), a.no_progress, f"bench {name} ({device})")
    os.makedirs(a.out, exist_ok=True)
    partial = os.path.join(a.out, "rows.partial.jsonl")     # survives a run cut short
    open(partial, "w").close()
    done = [0]

    def on_row(r: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(_row_note(r))
        done[0] += 1
        if a.no_progress:          # a log line per case instead of the bar
            print(f"[{done[0]}/{len(cases)}] {_row_note(r)}", file=sys.stderr, flush=True)
        with open(partial, "a") as fh:
            fh.write(json.dumps(r, default=str) + "\n")
    max_seconds = a.max_seconds or (0.4 if name == "quick" else 1.0)
    opts = RunOptions(max_seconds=max_seconds, check_rows=a.check_rows, budget=a.budget, isolate=not a.in_process,
                      total_seconds=a.time_budget)
    rows = run_cases(cases, opts, on_row=on_row)
    bar.close()
    wall = time.perf_counter() - t0
    os.makedirs(a.out, exist_ok=True)
    fits = fit_series(rows)
    paths = [] if a.no_plots else plot_scaling(rows, a.out)
    meta = run_meta("memattn " + " ".join(sys.argv[1:]) if sys.argv else "memattn bench", device, name)
    meta.update(wall_s=wall, options=opts.to_dict())
    write_json(os.path.join(a.out, "bench.json"), rows, meta, fits)
    write_csv(os.path.join(a.out, "bench.csv"), rows)
    os.remove(partial)         # bench.json holds every row now
    print(format_table(rows, title=f"memattn bench --suite {name} on {meta['device_name']} ({device}), "
                                   f"{wall:.0f} s"))
    ratios = format_peer_ratios(rows)
    if ratios:
        print(ratios)
    for f in fits:
        if f["quantity"] in ("fwd_ms", "fwdbwd_peak_mib") and len(f["ns"]) >= 3:
            print(f"  slope of {f['quantity']:<16} against N: {f['slope']:5.2f}  {f['line']}  [{f['series']}]")
    print(f"wrote {os.path.join(a.out, 'bench.json')}, bench.csv" + (f" and {len(paths)} plots" if paths else ""))
    return 0


# ----------------------------------------------------------------------------- memory
def _cmd_memory(a: argparse.Namespace) -> int:
    from .bench.budget import (MECHANISMS, breakdown_sweep, find_max_n, fit_exponents, format_breakdown,
                               format_max_n, mechanism_case)
    device = _resolve_device(a.device)
    mechs = a.mechanisms or ["memattn", "naive", "window"]
    bad = [m for m in mechs if m not in MECHANISMS]
    if bad:
        raise CLIError(f"--mechanisms: unknown {bad}; choose from {sorted(MECHANISMS)}")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    if a.max_n:
        if a.budget is None:
            raise CLIError("--max-n needs --budget (e.g. --budget 2GiB)")
        heads = a.heads or 128
        results = {}
        bar = _progress(0, a.no_progress, "probes")
        for mech in mechs:
            def make(n: int, mech=mech) -> object:
                return mechanism_case(mech, n, window=a.window, heads=heads, d=a.d, batch=a.batch,
                                      causal=a.causal, dtype=a.dtype, device=device)

            def on_probe(p: dict, mech=mech) -> None:
                bar.update(1)
                bar.set_postfix_str(f"{mech} N={p['n']} {'fits' if p['fits'] else p['status']}")
            results[mech] = find_max_n(make, a.budget, start=a.start, tolerance=a.tolerance, passes=a.passes,
                                       on_probe=on_probe)
        bar.close()
        wall = time.perf_counter() - t0
        print(f"shape: B={a.batch}, H={heads}, D={a.d}, {'causal' if a.causal else 'full'}, {a.dtype}, "
              f"{device}, pass {a.passes}; {wall:.0f} s")
        print(format_max_n(results, a.budget))
        with open(os.path.join(a.out, "memory_max_n.json"), "w") as f:
            json.dump({"schema": "memattn.memory.max_n/1", "budget": a.budget, "passes": a.passes,
                       "wall_s": wall, "method": "peak RSS growth of a fresh subprocess per probe (VmHWM), "
                       "watchdog-stopped when over budget; doubling then bisection guided by the measured peaks", "results": results}, f,
                      indent=1)
        return 0
    heads = a.heads or 16
    naive_heads = a.naive_heads or 1
    cases = [mechanism_case(mech, n, window=a.window, heads=naive_heads if mech == "naive" else heads, d=a.d,
                            batch=a.batch, causal=a.causal, dtype=a.dtype, device=device)
             for mech in mechs for n in sorted(a.n)]
    bar = _progress(len(cases), a.no_progress, "memory")

    def on_row(r: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{r['mechanism']} N={r['n']} {r.get('status')}")
    rows = breakdown_sweep(cases, on_row)
    bar.close()
    fits = fit_exponents(rows)
    wall = time.perf_counter() - t0
    print(f"shape: B={a.batch}, H={heads} (naive H={naive_heads}), D={a.d}, {'causal' if a.causal else 'full'}, "
          f"{a.dtype}, {device}; {wall:.0f} s")
    print(format_breakdown(rows, fits))
    with open(os.path.join(a.out, "memory.json"), "w") as f:
        json.dump({"schema": "memattn.memory/1", "wall_s": wall, "rows": rows, "fits": fits}, f, indent=1,
                  default=str)
    _plot_memory(rows, fits, a.out)
    print(f"wrote {os.path.join(a.out, 'memory.json')} and memory_scaling.png (MiB = 2**20 bytes)")
    return 0


def _plot_memory(rows: list[dict], fits: list[dict], out: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    drawn = False
    for ax, (pname, key) in zip(axes, (("fwd", "fwd_peak"), ("fwd+bwd", "train_peak"))):
        for f in fits:
            if f["pass"] != pname:
                continue
            h = next((r["case"]["heads"] for r in rows if r["mechanism"] == f["mechanism"]), "?")
            lab = f"{f['mechanism']} (H={h}; slope {f['slope']:.2f}, growth {f['growth']:.2f})" if f["growth"] \
                else f"{f['mechanism']} (H={h}; slope {f['slope']:.2f})"
            ax.plot(f["ns"], f["mib"], marker="o", label=lab)
            drawn = True
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel("peak memory above inputs (MiB = 2**20 bytes)")
        ax.set_title("forward (no_grad)" if pname == "fwd" else "forward + backward")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle("Measured peak memory against N (fresh subprocess per point, peak RSS growth)")
    path = os.path.join(out, "memory_scaling.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- demo
def _cmd_demo(a: argparse.Namespace) -> int:
    from .bench.demo import DEMO_MECHANISMS, run_demo

    device = _resolve_device(a.device)
    bar = _progress(len(a.n) * len(DEMO_MECHANISMS), a.no_progress, f"demo ({device})")

    def on_row(r: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(_row_note(r))
    res = run_demo(a.out, device=device, ns=sorted(a.n), heads=a.heads, d=a.d, window=a.window,
                   naive_max=a.naive_max, max_seconds=a.max_seconds, on_row=on_row, time_budget=a.time_budget)
    bar.close()
    print(res["table"])
    for f in res["fits"]:
        if f["quantity"] in ("fwdbwd_ms", "fwdbwd_peak_mib"):
            what = "time" if f["quantity"].endswith("ms") else "memory"
            print(f"  fwd+bwd {what:<6} ∝ N^{f['slope']:.2f}  {f['line']}")
    print(f"demo took {res['wall_s']:.0f} s; wrote {', '.join(res['paths'])}")
    return 0


# ------------------------------------------------------------------------------- eval
def _cmd_eval(argv: Sequence[str]) -> int:
    try:
        mod = importlib.import_module("memattn.eval.cli")
    except ImportError as e:
        print(f"memattn: error: 'memattn eval' is not available in this installation ({e}); it lives in "
              f"memattn.eval (install the eval extra: pip install 'memattn[eval]')", file=sys.stderr)
        return 2
    fn = getattr(mod, "main", None)
    if fn is None:
        print("memattn: error: memattn.eval.cli has no main(argv)", file=sys.stderr)
        return 2
    rc = fn(list(argv))
    return int(rc or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memattn`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
    Returns:
        exit code: 0 success, 2 usage error (argparse's convention).

    Example:
        >>> main(["bench", "--suite", "quick", "--device", "cpu", "--list"])  # doctest: +ELLIPSIS
        memattn ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        return _cmd_eval(argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.command == "bench":
            return _cmd_bench(a)
        if a.command == "memory":
            return _cmd_memory(a)
        if a.command == "demo":
            return _cmd_demo(a)
        parser.error(f"unknown command {a.command!r}")
    except CLIError as e:
        parser.exit(2, f"memattn {a.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
