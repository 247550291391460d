"""Run cases: one case in this process (:func:`run_case`), or a list of them with CPU cases in
fresh worker subprocesses (:func:`run_cases`). Every outcome is a row (a dict, schema in
:mod:`memattn.bench.report`): ``ok``, ``oom``, ``unsupported``, ``unavailable``,
``failed-check``, ``skipped`` or ``error`` — never an exception.

Per case: inputs (seeded normal) → build → a first forward (warm-up, compile) whose output
passes the quick check (:mod:`memattn.bench.check`) → peak memory of the forward under
``torch.no_grad`` → its time → peak memory of forward+backward (autograd forward, then
``backward`` of a fixed dout) → its time. A case failing the check is reported without
any speed or memory figure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from typing import Callable, Iterable

import torch

from .cases import MiB, Case, anchor_for
from .check import quick_check
from .memory import BUDGET_EXIT, Meter, predict
from .peers import Unavailable, Unsupported, impl_label, make_inputs, prepare
from .timing import allowed_pairs, flops, kv_bytes, tflops, time_ms

__all__ = ["RunOptions", "run_case", "run_cases", "base_row", "is_oom_error"]

PROTOCOL = "@@memattn "


class RunOptions:
    """Knobs of a run.

    Args:
        max_seconds: CPU timing budget per pass (repeats fit in it; at least one).
        check_rows: query rows of the quick check.
        budget: bytes a case may use (inputs included); None = no limit (CUDA) or
            :func:`memattn.bench.memory.default_cpu_budget` (CPU).
        isolate: CPU cases run in fresh worker subprocesses (peak RSS per case).
        warmup: run a tiny shape of the same case first (CPU; keeps code pages and thread
            pools out of the measured peak).
    """

    def __init__(self, *, max_seconds: float = 1.0, check_rows: int = 32, budget: int | None = None,
                 isolate: bool = True, warmup: bool = True, line_seconds: float | None = None,
                 total_seconds: float | None = None) -> None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
        if check_rows < 1:
            raise ValueError(f"check_rows must be >= 1, got {check_rows!r}")
        if budget is not None and budget <= 0:
            raise ValueError(f"budget must be > 0 bytes, got {budget!r}")
        self.max_seconds = max_seconds
        self.check_rows = check_rows
        self.budget = budget
        self.isolate = isolate
        self.warmup = warmup
        if line_seconds is not None and line_seconds <= 0:
            raise ValueError(f"line_seconds must be > 0, got {line_seconds!r}")
        self.line_seconds = line_seconds
        if total_seconds is not None and total_seconds <= 0:
            raise ValueError(f"total_seconds must be > 0, got {total_seconds!r}")
        self.total_seconds = total_seconds

    def to_dict(self) -> dict:
        return dict(max_seconds=self.max_seconds, check_rows=self.check_rows, budget=self.budget,
                    isolate=self.isolate, warmup=self.warmup, line_seconds=self.line_seconds,
                    total_seconds=self.total_seconds)


class TimePlanner:
    """Skips a case whose predicted time would overrun a time budget.

    ``line_seconds`` bounds each line (one implementation and mask across N, a line of a
    scaling plot); ``total_seconds`` bounds all cases together (spent time is counted from
    the first case). A case is predicted to cost 1.1 × (its line's last fwd + fwd+bwd
    time) × (N / N_last)^p + 0.5 s of setup; p is the slope of the line's last two cases
    clipped to [1, 2.5], or with one case 1 for linear-time mechanisms (windows, documents,
    linear attention, decoding) and 2 for the rest. None = no limit.
    """

    def __init__(self, line_seconds: float | None, total_seconds: float | None = None) -> None:
        self.line_seconds = line_seconds
        self.total_seconds = total_seconds
        self.hist: dict[tuple, list[tuple[int, float]]] = {}
        self.spent: dict[tuple, float] = {}
        self.start = time.perf_counter()

    @staticmethod
    def _line(case: Case) -> tuple:
        return (case.impl, case.backend, case.pattern, case.series_key())

    @staticmethod
    def _default_power(case: Case) -> float:
        spec = case.pattern_spec
        linear = case.impl in ("linear", "performer", "fla-linear") or case.is_decode or (
            spec is not None and spec.name in ("sliding_window", "documents", "dilated"))
        return 1.0 if linear else 2.0

    def reason_to_skip(self, case: Case) -> str | None:
        if self.line_seconds is None and self.total_seconds is None:
            return None
        key = self._line(case)
        h = self.hist.get(key)
        if not h:
            return None
        n1, t1 = h[-1]
        p = self._default_power(case)
        if len(h) >= 2 and h[-2][0] != n1 and h[-2][1] > 0 and t1 > 0:
            p = min(2.5, max(1.0, math.log(t1 / h[-2][1]) / math.log(n1 / h[-2][0])))
        pred = 1.1 * t1 * (case.n / n1) ** p + 0.5
        spent = self.spent.get(key, 0.0)
        if self.line_seconds is not None and spent + pred > self.line_seconds:
            return (f"time budget: predicted {pred:.0f} s (N^{p:.1f} from N={n1}) would take this line past "
                    f"{self.line_seconds:.0f} s ({spent:.0f} s spent)")
        total = time.perf_counter() - self.start
        if self.total_seconds is not None and total + pred > self.total_seconds:
            return (f"time budget: predicted {pred:.0f} s (N^{p:.1f} from N={n1}) would take the run past "
                    f"{self.total_seconds:.0f} s ({total:.0f} s spent)")
        return None

    def record(self, case: Case, wall: float, row: dict) -> None:
        key = self._line(case)
        self.spent[key] = self.spent.get(key, 0.0) + wall
        compute = ((row.get("fwd_ms") or 0.0) + (row.get("fwdbwd_ms") or 0.0)) / 1e3
        if row.get("status") == "ok" and compute > 0:
            self.hist.setdefault(key, []).append((case.n, compute))


def base_row(case: Case) -> dict:
    """The descriptive part of a row (no measurement yet)."""
    row = case.to_dict()
    row.update(label=impl_label(case), mask=case.mask_text, nq=case.q_len, kv_heads=case.hkv,
               status="", reason="", check_err=None, check_tol=None, check_kind=None,
               fwd_ms=None, fwdbwd_ms=None, fwd_tflops=None, fwdbwd_tflops=None, bwd_tflops=None,
               decode_tbps=None, fwd_peak_mib=None, fwdbwd_peak_mib=None, inputs_mib=None,
               predicted_fwd_mib=None, predicted_fwdbwd_mib=None, setup_ms=None, allowed_pairs=None,
               anchor_fwd=None, anchor_fwdbwd=None, anchor_unit=None, ratio_fwd=None, ratio_fwdbwd=None,
               memory_method=None, wall_s=None)
    a = anchor_for(case)
    if a is not None:
        row.update(anchor_fwd=a.fwd, anchor_fwdbwd=a.fwdbwd, anchor_unit=a.unit)
    return row


def is_oom_error(e: BaseException) -> bool:
    """True for an allocation failure (CUDA OOM, CPU allocator failure, MemoryError)."""
    if isinstance(e, MemoryError):
        return True
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(e, oom_cls):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "failed to allocate" in msg)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_WARMED: set[tuple] = set()


def _warmup(case: Case) -> None:
    """Run the same implementation once on a small shape (fwd, and fwd+bwd with a full-shape
    gradient), once per process and kind of case; errors are ignored (the real run reports them).

    The first backward given a non-scalar gradient leaves ~30 MiB of one-off allocations
    behind (seen on torch 2.13 CPU); a warm-up keeps them out of the measured peaks."""
    key = (case.impl, case.backend, case.d, case.heads, case.hkv, case.batch, case.dtype, case.device,
           case.causal, case.pattern_spec.name if case.pattern_spec else None, case.is_decode)
    if key in _WARMED:
        return
    _WARMED.add(key)
    n = min(case.n, 512)
    spec = case.pattern_spec
    pattern = case.pattern
    if spec is not None and spec.name == "documents":
        pattern = f"documents:{min(spec.args[0] if spec.args else 1, n)}"
    small = replace(case, n=n, nq=min(case.q_len, n) if case.nq is not None else None, pattern=pattern)
    try:
        q, k, v = make_inputs(small, requires_grad=True)
        p = prepare(small, q, k, v)
        with p.context():
            with torch.no_grad():
                p.fn()
            if "fwd+bwd" in case.passes:
                o = p.fn()
                o.backward(torch.ones_like(o))
    except Exception:  # noqa: BLE001
        pass


def _fill_ratios(row: dict) -> None:
    unit = row.get("anchor_unit")
    for key, meas in (("fwd", None), ("fwdbwd", None)):
        exp = row.get(f"anchor_{key}")
        if exp is None:
            continue
        if unit == "TFLOP/s":
            meas = row.get(f"{key}_tflops")
            if meas is not None:
                row[f"ratio_{key}"] = meas / exp
        elif unit == "ms":
            meas = row.get(f"{key}_ms")
            if meas:
                row[f"ratio_{key}"] = exp / meas  # > 1: faster than the anchor
        elif unit == "TB/s" and key == "fwd":
            meas = row.get("decode_tbps")
            if meas is not None:
                row[f"ratio_{key}"] = meas / exp


def run_case(case: Case, opts: RunOptions | None = None, meter: Meter | None = None) -> dict:
    """Run one case in this process and return its row (never raises for a case's failure).

    Args:
        case: the case.
        opts: :class:`RunOptions` (defaults if None).
        meter: a :class:`memattn.bench.memory.Meter` for the case's device (made if None).
    Returns:
        dict row; ``status`` says what happened.

    Example:
        >>> row = run_case(Case("naive", 128, d=16, heads=2, causal=True, passes=("fwd",)),
        ...                RunOptions(max_seconds=0.05))
        >>> row["status"], row["fwd_ms"] > 0
        ('ok', True)
    """
    opts = opts or RunOptions()
    meter = meter or Meter(case.device)
    row = base_row(case)
    row["memory_method"] = meter.method
    pred = predict(case)
    if pred.get("fwd_peak") is not None:
        row["predicted_fwd_mib"] = pred["fwd_peak"] / MiB
        row["predicted_fwdbwd_mib"] = pred["train_peak"] / MiB
    q = k = v = out = dout = None
    try:
        if case.device == "cuda" and not torch.cuda.is_available():
            raise Unsupported("CUDA is not available here")
        row["allowed_pairs"] = allowed_pairs(case)
        if opts.warmup and case.device == "cpu":
            _warmup(case)
        base0 = meter.start()
        q, k, v = make_inputs(case, requires_grad="fwd+bwd" in case.passes)
        _sync(case.device)
        row["inputs_mib"] = (meter.current() - base0) / MiB
        prepared = prepare(case, q, k, v)
        row["setup_ms"] = prepared.setup_ms
        with prepared.context():
            if case.device == "cuda":  # compile / autotune outside the measured call
                with torch.no_grad():
                    prepared.fn()
                _sync(case.device)
            base = meter.start()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = prepared.fn()
            _sync(case.device)
            first = [(time.perf_counter() - t0) * 1e3] if case.device == "cpu" else []
            peak = meter.peak()
            chk = quick_check(case, q, k, v, out, prepared.check, opts.check_rows)
            row.update(check_err=chk.err, check_tol=chk.tol, check_kind=chk.kind)
            if not chk.passed:
                row.update(status="failed-check", reason=f"{chk.detail}: max err {chk.err:.3g} > tol {chk.tol:.3g}")
                return row
            row["fwd_peak_mib"] = (peak - base) / MiB
            out = None
            if "fwd" in case.passes:
                with torch.no_grad():
                    row["fwd_ms"] = time_ms(prepared.fn, case.device, max_seconds=opts.max_seconds, samples=first)
                f = flops(case, "fwd", row["allowed_pairs"])
                row["fwd_tflops"] = tflops(f, row["fwd_ms"])
                if case.is_decode:
                    row["decode_tbps"] = kv_bytes(case) / (row["fwd_ms"] * 1e-3) / 1e12
            if "fwd+bwd" in case.passes:
                dout = torch.randn((case.batch, case.heads, case.q_len, case.d), dtype=q.dtype, device=q.device,
                                   generator=torch.Generator(device=q.device).manual_seed(1))

                def fwd_bwd() -> None:
                    prepared.fn().backward(dout)

                if case.device == "cuda":  # compile the backward outside the measured call
                    fwd_bwd()
                    _sync(case.device)
                for t in (q, k, v):
                    t.grad = None

                base = meter.start()
                t0 = time.perf_counter()
                fwd_bwd()
                _sync(case.device)
                first = [(time.perf_counter() - t0) * 1e3] if case.device == "cpu" else []
                row["fwdbwd_peak_mib"] = (meter.peak() - base) / MiB
                for t in (q, k, v):
                    t.grad = None
                row["fwdbwd_ms"] = time_ms(fwd_bwd, case.device, max_seconds=opts.max_seconds,
                                           grad_to_none=(q, k, v), samples=first)
                f = flops(case, "fwd+bwd", row["allowed_pairs"])
                row["fwdbwd_tflops"] = tflops(f, row["fwdbwd_ms"])
                if row["fwd_ms"] is not None and row["fwdbwd_ms"] > row["fwd_ms"]:
                    row["bwd_tflops"] = tflops(flops(case, "bwd", row["allowed_pairs"]),
                                               row["fwdbwd_ms"] - row["fwd_ms"])
        if opts.budget is not None:
            worst = max(x for x in (row["fwd_peak_mib"], row["fwdbwd_peak_mib"], 0.0) if x is not None)
            if (worst + (row["inputs_mib"] or 0.0)) * MiB > opts.budget:
                row.update(status="oom", reason=f"peak {worst + (row['inputs_mib'] or 0):.1f} MiB "
                                                f"(inputs included) > budget {opts.budget / MiB:.1f} MiB")
                for key in ("fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops", "bwd_tflops", "decode_tbps"):
                    row[key] = None
                return row
        row["status"] = "ok"
        _fill_ratios(row)
    except Unavailable as e:
        row.update(status="unavailable", reason=str(e))
    except Unsupported as e:
        row.update(status="unsupported", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a case's failure is a row
        if is_oom_error(e):
            row.update(status="oom", reason=str(e).splitlines()[0][:200])
        elif isinstance(e, (NotImplementedError, TypeError, ValueError)) and not isinstance(e, RuntimeError):
            row.update(status="unsupported", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        else:
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            row.update(status="error", reason=tb[:300])
    finally:
        q = k = v = out = dout = None
        if case.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def run_planned(case: Case, opts: RunOptions, planner: TimePlanner, meter: Meter | None = None) -> dict:
    """:func:`run_case` unless the planner predicts the case would overrun its line's time budget."""
    why = planner.reason_to_skip(case)
    if why is not None:
        row = base_row(case)
        row.update(status="skipped", reason=why)
        return row
    t0 = time.perf_counter()
    row = run_case(case, opts, meter)
    row["wall_s"] = time.perf_counter() - t0
    planner.record(case, row["wall_s"], row)
    return row


# --------------------------------------------------------------------------- isolation
def _worker_cmd() -> list[str]:
    return [sys.executable, "-m", "memattn.bench.worker"]


def _worker_env() -> dict:
    env = dict(os.environ)
    # every allocation of 1 MiB or more gets its own mapping, returned at free: RSS then
    # follows live tensors instead of glibc's heap (whose dynamic threshold keeps freed
    # blocks up to 32 MiB resident and makes peaks depend on allocation history)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_worker(mode: str, cases: list[Case], opts: RunOptions, on_event: Callable[[dict], None],
               extra: dict | None = None) -> int:
    """Start ``python -m memattn.bench.worker`` on cases; feed its protocol events to on_event.

    Returns the worker's exit code (:data:`memattn.bench.memory.BUDGET_EXIT` when its budget
    watchdog fired)."""
    payload = json.dumps({"mode": mode, "cases": [c.to_dict() for c in cases], "options": opts.to_dict(),
                          "extra": extra or {}})
    proc = subprocess.Popen(_worker_cmd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_worker_env())
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(payload)
    proc.stdin.close()
    for line in proc.stdout:
        if line.startswith(PROTOCOL):
            on_event(json.loads(line[len(PROTOCOL):]))
    stderr = proc.stderr.read() if proc.stderr else ""
    rc = proc.wait()
    if rc not in (0, BUDGET_EXIT):
        on_event({"event": "crash", "rc": rc, "stderr": stderr[-2000:]})
    return rc


def _series(case: Case) -> tuple:
    return (case.impl, case.backend, case.series_key())


def run_cases(cases: Iterable[Case], opts: RunOptions | None = None,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run cases and return their rows in order.

    CUDA cases run in this process. CPU cases run in a fresh worker subprocess when
    ``opts.isolate`` (restarted after a case that ran out of its budget or crashed); else
    in this process. After an ``oom`` row, larger N of the same
    series are skipped ("stop growth").

    Args:
        cases: the cases.
        opts: :class:`RunOptions`.
        on_row: called with each row as it completes (progress bars).
    Returns:
        list of row dicts, in the order of ``cases``.
    """
    opts = opts or RunOptions()
    cases = list(cases)
    rows: list[dict | None] = [None] * len(cases)
    oom_at: dict[tuple, int] = {}

    def emit(i: int, row: dict) -> None:
        rows[i] = row
        if row["status"] == "oom":
            key = _series(cases[i])
            oom_at[key] = min(oom_at.get(key, cases[i].n), cases[i].n)
        if on_row is not None:
            on_row(row)

    def skipped(i: int) -> bool:
        c = cases[i]
        lim = oom_at.get(_series(c))
        if lim is not None and c.n > lim:
            row = base_row(c)
            row.update(status="skipped", reason=f"out of memory at N={lim} already")
            emit(i, row)
            return True
        return False

    planner = TimePlanner(opts.line_seconds, opts.total_seconds)
    in_process = [i for i, c in enumerate(cases) if c.device == "cuda" or not opts.isolate]
    isolated = [i for i, c in enumerate(cases) if i not in set(in_process)]
    meters: dict[str, Meter] = {}
    for i in in_process:
        if skipped(i):
            continue
        dev = cases[i].device
        meter = meters.get(dev) or meters.setdefault(dev, Meter(dev) if dev == "cpu" or torch.cuda.is_available()
                                                     else Meter("cpu"))
        if dev == "cuda" and opts.budget is not None and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, opts.budget / total))
        emit(i, run_planned(cases[i], opts, planner, meter))
    # one worker runs the CPU cases in order (its peak RSS is reset before each
    # measurement); a worker that dies is replaced and carries on after the case it died in
    for idxs in ([isolated] if isolated else []):
        pending = list(idxs)
        while pending:
            pending = [i for i in pending if not skipped(i)]
            if not pending:
                break
            current: dict = {"i": None}
            done: set[int] = set()

            def on_event(ev: dict, pending=pending, current=current, done=done) -> None:
                if ev["event"] == "start":
                    current["i"] = pending[ev["index"]]
                elif ev["event"] == "row":
                    i = pending[ev["index"]]
                    done.add(i)
                    emit(i, ev["row"])
                elif ev["event"] == "budget":
                    current["budget"] = ev
                elif ev["event"] == "crash":
                    current["crash"] = ev

            rc = run_worker("bench", [cases[i] for i in pending], opts, on_event)
            i = current["i"]
            if i is None and rc == BUDGET_EXIT:
                i = pending[0]  # over the budget before its first case began: charge that case
            if i is not None and i not in done:  # the worker died inside case i
                row = base_row(cases[i])
                if rc == BUDGET_EXIT:
                    b = current.get("budget", {})
                    row.update(status="oom", reason=f"RSS grew past the budget of {b.get('budget', 0) / MiB:.0f} MiB "
                                                    f"(worker stopped at {b.get('grown', 0) / MiB:.0f} MiB)")
                elif rc in (-9, 137):
                    row.update(status="oom", reason="worker killed (SIGKILL: the system ran out of memory)")
                else:
                    err = current.get("crash", {}).get("stderr", "").strip().splitlines()
                    row.update(status="error", reason=f"worker exited with {rc}: {err[-1] if err else ''}"[:300])
                emit(i, row)
                done.add(i)
            elif i is None and rc != 0:
                err = current.get("crash", {}).get("stderr", "").strip().splitlines()
                for j in pending:
                    row = base_row(cases[j])
                    row.update(status="error", reason=f"worker failed to start ({rc}): {err[-1] if err else ''}"[:300])
                    emit(j, row)
                    done.add(j)
            pending = [j for j in pending if j not in done]
    return [r for r in rows if r is not None]

