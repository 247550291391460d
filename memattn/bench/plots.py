"""Scaling plots: time and peak memory against N on log-log axes, the fitted slope in the legend.

One figure per series (every field of a case but the implementation, the mask and N:
group, B, H, D, dtype, device), one line per (implementation, mask). The slope is the
least-squares exponent of y ∝ N^slope over the line's points (:func:`memattn.bench.timing.fit_slope`).
matplotlib is imported here only (the ``cli`` extra), with the Agg backend.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from .timing import fit_slope

__all__ = ["plot_scaling", "fit_series"]

_QUANT = {
    "time": (("fwd_ms", "forward"), ("fwdbwd_ms", "forward + backward"), "time (ms, median)"),
    "memory": (("fwd_peak_mib", "forward (no_grad)"), ("fwdbwd_peak_mib", "forward + backward"),
               "peak memory above inputs (MiB = 2**20 bytes)"),
}


def _series(r: dict) -> tuple:
    # batch is left out: a suite may hold B·N fixed (the anchors' 16384 tokens) and vary B with N
    nq = r["nq"] if r.get("nq") and r["nq"] != r["n"] else None
    return (r.get("group") or "", r["heads"], r.get("kv_heads"), r["d"], r["dtype"], r["device"], nq)


def _line(r: dict) -> str:
    return f"{r.get('label') or r['impl']} {r.get('mask', '')}".strip()


def _slug(key: tuple) -> str:
    group, h, hkv, d, dt, dev, nq = key
    s = f"{group or 'bench'}_H{h}_D{d}_{dt}_{dev}" + (f"_Nq{nq}" if nq else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def fit_series(rows: Sequence[dict]) -> list[dict]:
    """Fitted exponents of time and memory against N for every line with ≥ 2 sizes.

    Returns:
        list of ``{"series", "line", "impl", "quantity", "slope", "ns"}`` (quantity is a
        row field such as ``fwd_ms`` or ``fwdbwd_peak_mib``).
    """
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            lines.setdefault((_series(r), _line(r)), []).append(r)
    fits = []
    for (series, line), rs in lines.items():
        rs = sorted(rs, key=lambda r: r["n"])
        for q in ("fwd_ms", "fwdbwd_ms", "fwd_peak_mib", "fwdbwd_peak_mib"):
            pts = [(r["n"], r.get(q)) for r in rs if r.get(q) is not None]
            slope = fit_slope([p[0] for p in pts], [p[1] for p in pts])
            if slope is not None:
                fits.append({"series": _slug(series), "line": line, "impl": rs[0]["impl"], "quantity": q,
                             "slope": slope, "ns": [p[0] for p in pts]})
    return fits


def plot_scaling(rows: Sequence[dict], out_dir: str, *, prefix: str = "") -> list[str]:
    """Write ``{prefix}time_<series>.png`` and ``{prefix}memory_<series>.png`` for every
    series with at least two sizes; return the paths written.

    Args:
        rows: bench rows (only ``ok`` rows are drawn).
        out_dir: folder (created).
        prefix: file name prefix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    series: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            series.setdefault(_series(r), {}).setdefault(_line(r), []).append(r)
    paths = []
    for key, lines in sorted(series.items(), key=lambda kv: str(kv[0])):
        if max(len({r["n"] for r in rs}) for rs in lines.values()) < 2:
            continue
        group, h, hkv, d, dt, dev, nq = key
        bs = sorted({r["batch"] for rs in lines.values() for r in rs})
        tokens = {r["batch"] * r["n"] for rs in lines.values() for r in rs}
        b = str(bs[0]) if len(bs) == 1 else (f"{bs[-1]}..{bs[0]} (B·N={tokens.pop()})" if len(tokens) == 1
                                             else f"{bs[0]}..{bs[-1]}")
        shape = f"B={b}, H={h}" + (f"/{hkv}" if hkv and hkv != h else "") + f", D={d}, {dt}, {dev}" + (
            f", Nq={nq}" if nq else "")
        for kind, (a, bq, ylabel) in _QUANT.items():
            fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
            drawn = False
            for ax, (field, title) in zip(axes, (a, bq)):
                for name, rs in sorted(lines.items()):
                    pts = sorted((r["n"], r[field]) for r in rs if r.get(field) is not None and r[field] > 0)
                    if not pts:
                        continue
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                    slope = fit_slope(xs, ys)
                    lab = name + (f"  (slope {slope:.2f})" if slope is not None else "")
                    ax.plot(xs, ys, marker="o", label=lab)
                    drawn = True
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length N (tokens)")
                ax.set_ylabel(ylabel)
                ax.set_title(title)
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
            if not drawn:
                plt.close(fig)
                continue
            fig.suptitle(f"{'Time' if kind == 'time' else 'Peak memory'} against N — {group or 'bench'} ({shape})")
            path = os.path.join(out_dir, f"{prefix}{kind}_{_slug(key)}.png")
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
    return paths
