"""``memattn memory``: memory by category against N, its exponent, and the largest N that fits.

* :func:`breakdown_sweep` measures each (mechanism, N) in a fresh worker subprocess
  (:func:`memattn.bench.memory.measure_breakdown`) beside the prediction from shapes.
* :func:`fit_exponents` gives two exponents of the attention memory (peak above the
  inputs) against N: ``slope``, the plain log-log least-squares slope, and ``growth``,
  the exponent p of the best fit ``a + b·N^p`` (a ≥ 0 is the N-independent workspace,
  e.g. fixed-size score tiles, that bends the plain slope below the growth rate at small N).
* :func:`find_max_n` finds the largest N whose run fits a budget *by measurement*: N
  doubles from ``start`` until a probe exceeds the budget, then narrows the interval
  between the last fit and the first miss to a relative tolerance: the next probes sit just
  below and just above the N where the power law through the measured peaks of two fitting
  probes meets the budget, or at the midpoint when that prediction misleads. Each probe is a fresh worker
  subprocess: warm-up on a small shape, then the case runs once (forward+backward by
  default) while a watchdog thread compares the process's RSS growth with the budget and
  ends the probe as soon as it is exceeded (so an oversized N costs little). The reported
  peak is the kernel's RSS high-water mark minus the RSS before the inputs were made
  (inputs included). ``RLIMIT_AS`` is not used: torch reserves far more address space
  than it touches, so an address-space limit says nothing about the memory a run needs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

from .cases import MiB, Case, format_size
from .memory import BUDGET_EXIT, predict
from .runner import RunOptions, run_worker
from .timing import fit_slope

__all__ = ["MECHANISMS", "mechanism_case", "breakdown_sweep", "fit_exponents", "growth_exponent",
           "find_max_n", "format_breakdown", "format_max_n"]

# name -> (impl, pattern template); "{window}" is filled from the command line
MECHANISMS: dict[str, tuple[str, str | None]] = {
    "memattn": ("memattn", None),
    "naive": ("naive", None),
    "sdpa": ("sdpa", None),
    "window": ("memattn", "sliding_window:{window}"),
    "linear": ("linear", None),
    "performer": ("performer", None),
}


def mechanism_case(name: str, n: int, *, window: int = 512, backend: str = "auto", **shape) -> Case:
    """The :class:`Case` of a named mechanism of ``memattn memory`` / ``memattn demo``.

    Example:
        >>> mechanism_case("window", 4096, window=256, heads=4).pattern
        'sliding_window:256'
    """
    if name not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {sorted(MECHANISMS)}, got {name!r}")
    impl, pat = MECHANISMS[name]
    return Case(impl, n, pattern=pat.format(window=window) if pat else None, backend=backend,
                group=name, **shape)


def breakdown_sweep(cases: Sequence[Case], on_row: Callable[[dict], None] | None = None,
                    budget: int | None = None) -> list[dict]:
    """Measure each case's memory breakdown in its own fresh worker; add the prediction.

    Returns rows ``{"mechanism", "case", "n", "status", "reason", <measured bytes>, "predicted": {...}}``;
    a case larger than a failed one of the same mechanism is skipped.
    """
    rows: list[dict] = []
    failed: dict[str, int] = {}
    opts = RunOptions(budget=budget)
    for c in cases:
        row: dict = {"mechanism": c.group, "case": c.to_dict(), "n": c.n, "predicted": predict(c)}
        if c.group in failed and c.n > failed[c.group]:
            row.update(status="skipped", reason=f"out of memory at N={failed[c.group]} already")
        else:
            got: dict = {}

            def ev(e: dict, got=got) -> None:
                if e["event"] == "row":
                    got.update(e["row"])
                elif e["event"] == "budget":
                    got["budget"] = e
            rc = run_worker("breakdown", [c], opts, ev)
            if rc == BUDGET_EXIT:
                got = {"status": "oom", "reason": f"RSS grew past the budget ({format_size(opts.budget or 0)})"}
            elif rc != 0 and not got:
                got = {"status": "oom" if rc in (-9, 137) else "error", "reason": f"worker exited with {rc}"}
            row.update(got)
            if row.get("status") == "oom":
                failed[c.group] = min(failed.get(c.group, c.n), c.n)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def growth_exponent(ns: Sequence[float], ys: Sequence[float]) -> float | None:
    """Exponent p of the least-squares fit ``y ≈ a + b·N^p`` with a ≥ 0, b > 0 (relative error).

    p is searched on a grid of 0.005 in [0.3, 3]; for each p, (a, b) is the weighted
    linear least squares of y on (1, N^p) with weights 1/y (so every point counts by its
    relative error), a clipped at 0. None with fewer than three points.

    Example:
        >>> round(growth_exponent([1, 2, 4, 8], [10 + 3 * n for n in [1, 2, 4, 8]]), 2)
        1.0
    """
    pts = [(float(n), float(y)) for n, y in zip(ns, ys) if y is not None and y > 0]
    if len(pts) < 3:
        return None
    best = (math.inf, None)
    p = 0.3
    while p <= 3.0 + 1e-9:
        xs = [n**p for n, _ in pts]
        w = [1.0 / y for _, y in pts]
        # minimise sum (w (a + b x - y))^2 over a >= 0
        sw2 = sum(wi * wi for wi in w)
        swx = sum(wi * wi * x for wi, x in zip(w, xs))
        sxx = sum(wi * wi * x * x for wi, x in zip(w, xs))
        swy = sum(wi * wi * y for wi, (_, y) in zip(w, pts))
        sxy = sum(wi * wi * x * y for wi, x, (_, y) in zip(w, xs, pts))
        det = sw2 * sxx - swx * swx
        a = (sxx * swy - swx * sxy) / det if det else 0.0
        b = (sw2 * sxy - swx * swy) / det if det else 0.0
        if a < 0 or b <= 0:
            a = 0.0
            b = sxy / sxx if sxx else 0.0
        if b > 0:
            err = sum((wi * (a + b * x - y)) ** 2 for wi, x, (_, y) in zip(w, xs, pts))
            if err < best[0]:
                best = (err, p)
        p += 0.005
    return best[1]


def fit_exponents(rows: Sequence[dict]) -> list[dict]:
    """Per mechanism and pass: ``slope`` (log-log) and ``growth`` (a + b·N^p) of the peak above inputs.

    Returns ``[{"mechanism", "pass", "slope", "growth", "ns", "mib"}]`` (pass "fwd" or "fwd+bwd").
    """
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by.setdefault(r["mechanism"], []).append(r)
    out = []
    for mech, rs in by.items():
        rs = sorted(rs, key=lambda r: r["n"])
        for key, name in (("fwd_peak", "fwd"), ("train_peak", "fwd+bwd")):
            ns = [r["n"] for r in rs]
            ys = [r[key] / MiB for r in rs]
            out.append({"mechanism": mech, "pass": name, "slope": fit_slope(ns, ys), "growth": growth_exponent(ns, ys),
                        "ns": ns, "mib": ys})
    return out


def _mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.1f}"


def format_breakdown(rows: Sequence[dict], fits: Sequence[dict] = ()) -> str:
    """Text table: per mechanism and N, measured MiB by category (predicted in brackets)."""
    head = ["mechanism", "N", "inputs", "outputs", "saved", "wksp fwd", "grads", "wksp bwd", "block map",
            "fwd peak (pred)", "f+b peak (pred)", "notes"]
    body = []
    for r in rows:
        p = r.get("predicted", {})
        if r.get("status") != "ok":
            body.append([r["mechanism"], str(r["n"])] + ["-"] * 9 + [f"{r.get('status', '?').upper()}: "
                                                                      f"{r.get('reason', '')}"[:80]])
            continue
        body.append([r["mechanism"], str(r["n"]), _mib(r["inputs"]), _mib(r["outputs"]), _mib(r["saved"]),
                     _mib(r["workspace_fwd"]), _mib(r["grads"]), _mib(r["workspace_bwd"]), _mib(r["block_map"]),
                     f"{_mib(r['fwd_peak'])} ({_mib(p.get('fwd_peak'))})",
                     f"{_mib(r['train_peak'])} ({_mib(p.get('train_peak'))})", ""])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    for b in body:
        lines.append("  ".join((c.rjust(w) if 1 <= j <= 10 else c.ljust(w)) for j, (c, w) in
                               enumerate(zip(b, widths))).rstrip())
    lines.append("MiB = 2**20 bytes, measured (predicted from shapes). Peaks are above the inputs (q, k, v, dout);"
                 " fwd under no_grad, f+b = autograd forward + backward.")
    if fits:
        lines.append("")
        lines.append("exponent of peak memory above inputs against N:")
        for f in fits:
            s = "-" if f["slope"] is None else f"{f['slope']:.2f}"
            g = "-" if f["growth"] is None else f"{f['growth']:.2f}"
            lines.append(f"  {f['mechanism']:<10} {f['pass']:<8} log-log slope {s:>5}   growth exponent "
                         f"(a + b·N^p) {g:>5}   N = {f['ns'][0]}..{f['ns'][-1]}")
    return "\n".join(lines)


def find_max_n(make_case: Callable[[int], Case], budget: int, *, start: int = 1024, limit: int = 1 << 22,
               multiple: int = 128, tolerance: float = 0.1, passes: str = "fwd+bwd",
               on_probe: Callable[[dict], None] | None = None) -> dict:
    """Largest N (a multiple of ``multiple``) whose run fits ``budget`` bytes, measured.

    Args:
        make_case: N → Case.
        budget: bytes (inputs included).
        start: first N probed. limit: largest N probed.
        multiple: N is rounded down to a multiple of this.
        tolerance: the search stops when (miss − fit) / fit ≤ tolerance (or they are one multiple apart).
        passes: "fwd+bwd" (training) or "fwd" (inference, no_grad).
        on_probe: called with every probe's record.
    Returns:
        ``{"max_n", "first_miss", "probes": [{"n", "fits", "peak", "status", "reason"}], "budget"}``;
        max_n is None when even ``start`` does not fit.
    """
    if budget <= 0:
        raise ValueError(f"budget must be > 0 bytes, got {budget!r}")
    if passes not in ("fwd", "fwd+bwd"):
        raise ValueError(f"passes must be 'fwd' or 'fwd+bwd', got {passes!r}")
    probes: list[dict] = []

    def probe(n: int) -> bool:
        rec: dict = {"n": n, "fits": False, "peak": None, "status": "", "reason": ""}
        got: dict = {}

        def ev(e: dict) -> None:
            if e["event"] == "row":
                got.update(e["row"])
            elif e["event"] == "budget":
                got["grown"] = e["grown"]
        rc = run_worker("probe", [make_case(n)], RunOptions(budget=budget), ev, {"passes": passes})
        if rc == BUDGET_EXIT:
            rec.update(status="over", peak=got.get("grown"), reason="watchdog: RSS growth passed the budget")
        elif got.get("status") == "ok":
            rec.update(peak=got["peak"], fits=got["peak"] <= budget,
                       status="fits" if got["peak"] <= budget else "over")
        else:
            rec.update(status=got.get("status", "error"), reason=got.get("reason", f"worker exited with {rc}"))
        probes.append(rec)
        if on_probe is not None:
            on_probe(rec)
        return rec["fits"]

    lo, hi = None, None
    n = max(multiple, start // multiple * multiple)
    tried: set[int] = set()
    while n <= limit and n not in tried:
        tried.add(n)
        if probe(n):
            lo = n
        else:
            hi = n
        if lo is None:
            break  # even the first N does not fit
        if hi is None:
            n = 2 * lo
            continue
        if (hi - lo) / lo <= tolerance or hi - lo <= multiple:
            break
        n = _next_probe(probes, budget, lo, hi, multiple, tried)
    return {"max_n": lo, "first_miss": hi, "probes": probes, "budget": budget, "passes": passes,
            "case": replace(make_case(lo or start)).to_dict()}


def _next_probe(probes: list[dict], budget: int, lo: int, hi: int, multiple: int, tried: set[int]) -> int:
    """Next N between lo (fits) and hi (does not).

    The power law through the measured peaks of two fitting probes (the largest, and the
    largest at least 5 % below it: a secant step) predicts N* where the peak meets the budget; the multiples
    just below and just above N* are probed in turn (a right prediction ends the search in
    two probes), else the midpoint (plain bisection when the prediction misleads)."""
    mid = (lo + hi) // 2 // multiple * multiple
    fits = sorted((p["n"], p["peak"]) for p in probes if p["fits"] and p["peak"])
    cands: list[int] = []
    if fits:
        n2, y2 = fits[-1]
        older = [(n, y) for n, y in fits if n * 1.05 <= n2 and y > 0]
        if older and y2 > older[-1][1]:
            n1, y1 = older[-1]
            slope = min(2.5, max(0.5, math.log(y2 / y1) / math.log(n2 / n1)))
            star = n2 * (budget / y2) ** (1.0 / slope)
            below = int(star) // multiple * multiple
            cands = [below, below + multiple]
    for cand in cands + [mid]:
        if lo < cand < hi and cand not in tried:
            return cand
    return hi  # nothing left between: the loop stops on the tried value


def format_max_n(results: dict[str, dict], budget: int) -> str:
    """One table: mechanism, largest N that fits, first N that did not, peak at the largest N, probes."""
    head = ["mechanism", "max N (fits)", "first N over", "peak at max N", "probes"]
    body = []
    for mech, r in results.items():
        peak = next((p["peak"] for p in r["probes"] if p["n"] == r["max_n"]), None)
        body.append([mech, str(r["max_n"] or "none"), str(r["first_miss"] or f"> {r['probes'][-1]['n']}"),
                     "-" if peak is None else f"{peak / MiB:.0f} MiB",
                     " ".join(f"{p['n']}{'✓' if p['fits'] else '✗'}" for p in r["probes"])])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [f"largest N within a budget of {format_size(budget)} (measured: peak RSS growth of a fresh "
             f"subprocess, inputs included)",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)
