"""``memattn demo``: a short scaling run on whatever device is present.

Exact memattn, naive attention, torch SDPA, memattn with a causal sliding window and
linear attention (elu+1), causal, B=1, H=4, D=64, float32 on the CPU (bfloat16 on CUDA),
N from 1k to 16k. Naive attention stops at 8k on the CPU (its scores alone need
H·N²·4 bytes: 8 GiB at 16k). Each implementation runs in one fresh worker process, whose
peak RSS growth above the inputs is read per pass (the kernel's high-water mark, reset
before each measurement). Prints the table, writes ``demo.json``, ``demo.csv`` and PNG
plots of time and memory against N into ``out``.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

from .budget import mechanism_case
from .cases import Case
from .plots import fit_series, plot_scaling
from .report import format_table, run_meta, write_csv, write_json
from .runner import RunOptions, base_row, run_cases

__all__ = ["demo_cases", "run_demo", "DEMO_MECHANISMS"]

DEMO_MECHANISMS = ("memattn", "naive", "sdpa", "window", "linear")


def demo_cases(device: str, ns: Sequence[int], *, heads: int = 4, d: int = 64, window: int = 512,
               naive_max: int = 8192, mechanisms: Sequence[str] = DEMO_MECHANISMS) -> tuple[list[Case], list[dict]]:
    """The demo's cases, and the rows of cases skipped up front (naive beyond ``naive_max``).

    Example:
        >>> cases, skipped = demo_cases("cpu", [1024, 16384])
        >>> [r["n"] for r in skipped]
        [16384]
    """
    dtype = "float32" if device == "cpu" else "bfloat16"
    cases, skipped = [], []
    # run order under the time budget: exact memattn's whole line, then SDPA's (its main
    # peer), then the other mechanisms by increasing N, so each gets the small sizes first
    lead = [m for m in ("memattn", "sdpa") if m in mechanisms]
    order = [(m, n) for m in lead for n in ns] + [(m, n) for n in ns for m in mechanisms if m not in lead]
    for mech, n in order:
        c = mechanism_case(mech, n, window=window, d=d, heads=heads, batch=1, causal=True, dtype=dtype,
                           device=device)
        c = Case(**{**c.to_dict(), "passes": ("fwd", "fwd+bwd"), "group": "demo"})
        if mech == "naive" and n > naive_max:
            row = base_row(c)
            row.update(status="skipped", reason=f"naive capped at N={naive_max} on {device}: its scores "
                                                f"alone need {heads * n * n * 4 / 2**30:.0f} GiB and minutes")
            skipped.append(row)
        else:
            cases.append(c)
    return cases, skipped


def run_demo(out: str, *, device: str | None = None, ns: Sequence[int] = (1024, 2048, 4096, 8192, 16384),
             heads: int = 4, d: int = 64, window: int = 512, naive_max: int = 8192, max_seconds: float = 0.25,
             mechanisms: Sequence[str] = DEMO_MECHANISMS, on_row: Callable[[dict], None] | None = None,
             plots: bool = True, time_budget: float | None = 85.0) -> dict:
    """Run the demo, print nothing, write JSON/CSV/plots into ``out``; return a summary.

    Cases run in the order of :func:`demo_cases` (memattn's line, SDPA's, then the others by
    increasing N). A case whose predicted time would take the run past ``time_budget``
    seconds is skipped, with the reason in its row (None: no limit).

    Returns:
        ``{"rows", "fits", "paths", "wall_s", "table"}``.
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    cases, skipped = demo_cases(device, ns, heads=heads, d=d, window=window, naive_max=naive_max,
                                mechanisms=mechanisms)
    for r in skipped:
        if on_row:
            on_row(r)
    rows = run_cases(cases, RunOptions(max_seconds=max_seconds, total_seconds=time_budget), on_row=on_row) + skipped
    order = {m: i for i, m in enumerate(mechanisms)}
    rows.sort(key=lambda r: (order.get(_mech_of(r), 99), r["n"]))
    os.makedirs(out, exist_ok=True)
    fits = fit_series(rows)
    paths = plot_scaling(rows, out, prefix="demo_") if plots else []
    wall = time.perf_counter() - t0
    meta = run_meta("memattn demo", device)
    meta["wall_s"] = wall
    write_json(os.path.join(out, "demo.json"), rows, meta, fits)
    write_csv(os.path.join(out, "demo.csv"), rows)
    table = format_table(rows, title=f"memattn demo on {meta['device_name']} ({device}): causal, B=1, H={heads}, "
                                     f"D={d}, {'float32' if device == 'cpu' else 'bfloat16'}")
    return {"rows": rows, "fits": fits, "paths": paths + [os.path.join(out, "demo.json"),
                                                          os.path.join(out, "demo.csv")],
            "wall_s": wall, "table": table}


def _mech_of(row: dict) -> str:
    if row["impl"] == "memattn":
        return "window" if row.get("pattern") else "memattn"
    return row["impl"]
