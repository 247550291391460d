"""Rows out: a readable table, JSON and CSV.

JSON schema (``SCHEMA = "memattn.bench/1"``)::

    {"schema": "memattn.bench/1",
     "meta": {"command", "suite", "device", "device_name", "torch", "python", "platform",
              "cpu_count", "started", "wall_s", "units": {...}, "memory_method"},
     "rows": [{<ROW_FIELDS>}, ...],
     "fits": [{"series", "impl", "label", "quantity", "slope", "ns"}, ...]}

Every row has every field of :data:`ROW_FIELDS` (None where it does not apply). Units:
``*_ms`` milliseconds (median), ``*_tflops`` 1e12 FLOP/s on allowed pairs, ``decode_tbps``
1e12 bytes of K+V per second, ``*_mib`` 2**20 bytes (peak above the inputs; ``inputs_mib``
the inputs themselves). ``status`` is one of :data:`STATUSES`.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from typing import Iterable, Sequence

__all__ = ["SCHEMA", "ROW_FIELDS", "STATUSES", "format_table", "format_peer_ratios", "write_json", "write_csv",
           "run_meta", "validate_payload"]

SCHEMA = "memattn.bench/1"
STATUSES = ("ok", "oom", "unsupported", "unavailable", "failed-check", "skipped", "error")
ROW_FIELDS = (
    "impl", "label", "backend", "group", "mask", "pattern", "causal", "batch", "heads", "kv_heads", "nq", "n", "d",
    "dtype", "device", "passes", "status", "reason", "check_kind", "check_err", "check_tol",
    "fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops", "bwd_tflops", "decode_tbps",
    "inputs_mib", "fwd_peak_mib", "fwdbwd_peak_mib", "predicted_fwd_mib", "predicted_fwdbwd_mib",
    "setup_ms", "allowed_pairs", "anchor_fwd", "anchor_fwdbwd", "anchor_unit", "ratio_fwd", "ratio_fwdbwd",
    "memory_method", "wall_s",
)
UNITS = {"ms": "milliseconds, median", "TFLOP/s": "1e12 FLOP/s on allowed pairs (fwd 4·B·H·pairs·D, "
         "bwd 2.5×, fwd+bwd 3.5×)", "TB/s": "1e12 bytes of K and V read per second (decoding)",
         "MiB": "2**20 bytes, peak above the inputs"}


def run_meta(command: str, device: str, suite: str | None = None) -> dict:
    """Where and when a run happened (torch, device name, CPU count, ...)."""
    import torch

    name = platform.processor() or platform.machine()
    if device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    return {"command": command, "suite": suite, "device": device, "device_name": name,
            "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "units": UNITS}


def _num(x, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) >= 1000 and fmt == "{:.2f}":
        return f"{x:.0f}"
    return fmt.format(x)


def _shape(r: dict) -> str:
    h = f"H{r['heads']}" + (f"/{r['kv_heads']}" if r.get("kv_heads") and r["kv_heads"] != r["heads"] else "")
    nq = f" Nq{r['nq']}" if r.get("nq") and r["nq"] != r["n"] else ""
    return f"B{r['batch']} {h}{nq} N{r['n']} D{r['d']}"


def format_table(rows: Sequence[dict], *, title: str | None = None) -> str:
    """A fixed-width text table of rows; non-ok rows show their status and reason.

    Columns: implementation, mask, shape, dtype, fwd ms, fwd+bwd ms, fwd and fwd+bwd
    TFLOP/s, peak MiB of each pass (above the inputs); plus TB/s when a row decodes and
    the anchors.md figure with the ratio measured/expected when a row has one.

    Example:
        >>> print(format_table([]))
        (no rows)
    """
    if not rows:
        return "(no rows)"
    show_bw = any(r.get("decode_tbps") is not None for r in rows)
    show_anchor = any(r.get("anchor_fwd") is not None or r.get("anchor_fwdbwd") is not None for r in rows)
    head = ["impl", "mask", "shape", "dtype", "fwd ms", "f+b ms", "fwd TF/s", "f+b TF/s", "fwd MiB", "f+b MiB"]
    if show_bw:
        head.append("TB/s")
    if show_anchor:
        head.append("anchor (unit) → ratio")
    head.append("notes")
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        cells = [r.get("label") or r["impl"], r.get("mask", ""), _shape(r), r["dtype"]]
        if ok:
            cells += [_num(r.get("fwd_ms")), _num(r.get("fwdbwd_ms")), _num(r.get("fwd_tflops"), "{:.3g}"),
                      _num(r.get("fwdbwd_tflops"), "{:.3g}"), _num(r.get("fwd_peak_mib"), "{:.1f}"),
                      _num(r.get("fwdbwd_peak_mib"), "{:.1f}")]
        else:
            cells += ["-"] * 6
        if show_bw:
            cells.append(_num(r.get("decode_tbps"), "{:.3g}") if ok else "-")
        if show_anchor:
            a = ""
            if r.get("anchor_fwd") is not None or r.get("anchor_fwdbwd") is not None:
                exp = "/".join(_num(r.get(k), "{:g}") for k in ("anchor_fwd", "anchor_fwdbwd")
                               if r.get(k) is not None)
                rat = "/".join(("×" + _num(r.get(k), "{:.2f}")) for k in ("ratio_fwd", "ratio_fwdbwd")
                               if r.get(k) is not None)
                a = f"{exp} {r.get('anchor_unit')}" + (f" → {rat}" if rat else "")
            cells.append(a)
        note = "" if ok else f"{r['status'].upper()}: {r.get('reason', '')}"
        if ok and r.get("setup_ms") is not None:
            note = f"mask build {r['setup_ms']:.2f} ms"
        cells.append(note[:110])
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    numeric = set(range(4, len(head) - (2 if show_anchor else 1)))

    def fmt(cells: Iterable[str]) -> str:
        out = []
        for j, c in enumerate(cells):
            c = str(c)
            out.append(c.rjust(widths[j]) if j in numeric else c.ljust(widths[j]))
        return "  ".join(out).rstrip()

    lines = []
    if title:
        lines.append(title)
    lines.append(fmt(head))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(c) for c in body)
    lines.append("times: median ms; TF/s: 1e12 FLOP/s on allowed pairs; MiB: 2**20 bytes of peak memory "
                 "above the inputs (fwd under no_grad; f+b = forward with autograd + backward)")
    return "\n".join(lines)


_APPROX = ("linear", "performer", "fla-linear")  # not peers of exact attention


def format_peer_ratios(rows: Sequence[dict]) -> str:
    """memattn against each peer measured in the same run on the same shape: peer time / memattn
    time for the forward and forward+backward (> 1: memattn is faster), and the memory ratio.

    A peer is an exact implementation whose group, N, Nq, D, heads, batch, causal and dtype
    agree (its mask may differ, e.g. dense causal cuDNN beside a window: the mask is then
    shown); approximate mechanisms are not peers of exact attention."""
    def key(r: dict) -> tuple:
        return (r.get("group"), r["n"], r.get("nq"), r["d"], r["heads"], r["batch"], r["causal"], r["dtype"])

    ok = [r for r in rows if r.get("status") == "ok"]
    lines = []
    for m in ok:
        if m["impl"] != "memattn":
            continue
        for p in ok:
            if p is m or p["impl"] == "memattn" or key(p) != key(m) or p["impl"] in _APPROX:
                continue
            parts = []
            for f, name in (("fwd_ms", "fwd"), ("fwdbwd_ms", "f+b")):
                if m.get(f) and p.get(f):
                    parts.append(f"{name} ×{p[f] / m[f]:.2f}")
            if m.get("fwdbwd_peak_mib") and p.get("fwdbwd_peak_mib"):
                parts.append(f"f+b memory ×{m['fwdbwd_peak_mib'] / p['fwdbwd_peak_mib']:.2f}")
            if parts:
                other = "" if p.get("mask") == m.get("mask") else f" [{p.get('mask')}]"
                lines.append(f"  {m.get('label')} {m.get('mask')} {_shape(m)}  vs {p.get('label')}{other}: "
                             + ", ".join(parts))
    if not lines:
        return ""
    return ("memattn vs peers in this run (speed: peer time / memattn time, > 1 = memattn faster; "
            "memory: memattn / peer):\n" + "\n".join(lines))


def write_json(path: str, rows: Sequence[dict], meta: dict, fits: Sequence[dict] = ()) -> None:
    """Write ``{"schema", "meta", "rows", "fits"}`` to path (rows completed with every ROW_FIELD)."""
    payload = {"schema": SCHEMA, "meta": meta,
               "rows": [{k: r.get(k) for k in ROW_FIELDS} | {k: v for k, v in r.items() if k not in ROW_FIELDS}
                        for r in rows],
               "fits": list(fits)}
    validate_payload(payload)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """Write rows to CSV with the ROW_FIELDS columns, in that order."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("|".join(r[k]) if isinstance(r.get(k), (list, tuple)) else r.get(k)) for k in ROW_FIELDS})


def validate_payload(payload: dict) -> None:
    """Raise ValueError unless payload follows the bench JSON schema."""
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise ValueError(f"payload must be a dict with schema {SCHEMA!r}")
    for key in ("meta", "rows", "fits"):
        if key not in payload:
            raise ValueError(f"payload lacks {key!r}")
    for i, r in enumerate(payload["rows"]):
        missing = [k for k in ROW_FIELDS if k not in r]
        if missing:
            raise ValueError(f"row {i} lacks fields {missing}")
        if r["status"] not in STATUSES:
            raise ValueError(f"row {i} has status {r['status']!r}, not one of {STATUSES}")
        if r["status"] != "ok" and any(r.get(k) is not None for k in ("fwd_ms", "fwdbwd_ms")):
            raise ValueError(f"row {i} is {r['status']} but carries a time")
