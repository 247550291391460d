"""Worker process of :mod:`memattn.bench` (``python -m memattn.bench.worker``).

Reads one JSON object from stdin: ``{"mode": "bench" | "breakdown" | "probe", "cases":
[...], "options": {...}, "extra": {...}}``; writes protocol lines ``@@memattn {json}`` to
stdout: ``{"event": "start", "index": i}`` before case i, then ``{"event": "row", "index": i,
"row": {...}}``. A budget watchdog (:class:`memattn.bench.memory.Watchdog`) ends the process
with exit code 75 after writing ``{"event": "budget", ...}`` when RSS growth above the
worker's baseline exceeds the budget. Not a public interface.
"""

from __future__ import annotations

import json
import os
import sys
import threading

_LOCK = threading.Lock()
_OUT = sys.stdout


def _write(ev: dict) -> None:
    line = "@@memattn " + json.dumps(ev) + "\n"
    with _LOCK:
        os.write(_OUT.fileno(), line.encode())


def main() -> int:
    req = json.loads(sys.stdin.read())
    sys.stdout = sys.stderr  # anything a library prints stays off the protocol stream
    import torch  # noqa: F401

    from .cases import Case
    from .memory import Meter, Watchdog, default_cpu_budget, measure_breakdown, measure_probe, rss_bytes
    from .runner import RunOptions, TimePlanner, run_planned

    o = req.get("options", {})
    opts = RunOptions(max_seconds=o.get("max_seconds", 1.0), check_rows=o.get("check_rows", 32),
                      budget=o.get("budget"), isolate=False, warmup=o.get("warmup", True),
                      line_seconds=o.get("line_seconds"), total_seconds=o.get("total_seconds"))
    planner = TimePlanner(opts.line_seconds, opts.total_seconds)
    cases = [Case.from_dict(c) for c in req["cases"]]
    wd = None
    if any(c.device == "cpu" for c in cases):
        wd = Watchdog(opts.budget or default_cpu_budget(), base=rss_bytes(), write=_write)
    meter = Meter("cpu")
    for i, case in enumerate(cases):
        _write({"event": "start", "index": i})
        if req["mode"] == "bench":
            row = run_planned(case, opts, planner, meter if case.device == "cpu" else None)
        elif req["mode"] == "breakdown":
            row = measure_breakdown(case)
        elif req["mode"] == "probe":
            row = measure_probe(case, req.get("extra", {}).get("passes", "fwd+bwd"), wd)
        else:
            raise ValueError(f"unknown worker mode {req['mode']!r}")
        _write({"event": "row", "index": i, "row": row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
