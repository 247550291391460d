"""Scaling plots: time and peak memory against N on log-log axes, the fitted slope in the legend;
and the peer / memattn time ratios of a GPU run as bars (:func:`plot_peer_ratios`), with the
same run's rows as markdown tables (:func:`peer_tables_markdown`).

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

__all__ = ["plot_scaling", "fit_series", "peer_ratios", "peer_tables_markdown", "plot_peer_ratios"]

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


# ----------------------------------------------------------------------------- peer ratios
_PEERS = (("flex", "FlexAttention"), ("sdpa_flash", "SDPA FlashAttention-2"), ("sdpa_cudnn", "SDPA cuDNN"))
_SPARSE_NAMES = {"window1024": "causal window 1024", "documents16_causal": "16 causal documents",
                "bigbird": "BigBird", "longformer": "Longformer 512 + 16 globals"}


def _by_case(section: Sequence[dict]) -> list[tuple[tuple, dict[str, dict]]]:
    """((kind, N, D), {impl: row}) of the ok rows, in first-seen order, for cases with a memattn row."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in section:
        if r.get("status") == "ok" and isinstance(r.get("fwd_ms"), (int, float)):
            by.setdefault((r["kind"], r["N"], r["D"]), {})[r["impl"]] = r
    return [(key, impls) for key, impls in by.items() if "memattn" in impls]


def peer_ratios(section: Sequence[dict], dense: bool) -> list[dict]:
    """Per (case, peer), the ratio peer time / memattn time (> 1: memattn faster).

    Args:
        section: rows of one run, as ``scripts/gpu_triton.py`` writes them (``dense`` or
            ``sparse`` of h200.json): kind, N, D, impl, fwd_ms, fwdbwd_ms, status.
        dense: label the cases as dense shapes (else by sparse pattern name).
    Returns:
        dicts with label, peer, fwd, fwdbwd, dense; cases without an ok memattn row are left out.

    Example:
        >>> rows = [dict(kind="causal", N=4096, D=128, impl=i, fwd_ms=t, fwdbwd_ms=t, status="ok")
        ...         for i, t in (("memattn", 1.0), ("flex", 1.5))]
        >>> peer_ratios(rows, dense=True)[0]["fwd"]
        1.5
    """
    out = []
    for (kind, n, d), impls in _by_case(section):
        ours = impls["memattn"]
        n_txt = f"{n // 1024}k"
        label = f"D={d} N={n_txt} {kind}" if dense else f"{_SPARSE_NAMES.get(kind, kind)} N={n_txt}"
        for peer, _ in _PEERS:
            p = impls.get(peer)
            if p is None or not isinstance(p.get("fwdbwd_ms"), (int, float)):
                continue
            out.append({"label": label, "peer": peer, "fwd": p["fwd_ms"] / ours["fwd_ms"],
                        "fwdbwd": p["fwdbwd_ms"] / ours["fwdbwd_ms"], "dense": dense})
    return out


def _pair(a, b, fmt: str) -> str:
    ok = all(isinstance(x, (int, float)) for x in (a, b))
    return f"{fmt.format(a)} / {fmt.format(b)}" if ok else "–"


def _ms_text(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    ms = seconds * 1e3
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def peer_tables_markdown(dense: Sequence[dict], sparse: Sequence[dict]) -> str:
    """The dense and sparse tables of ``docs/performance.md`` from one run's rows.

    Dense: per (D, N, mask) TFLOP/s forward / forward+backward of memattn and each peer, then
    the ratios peer time / memattn time against Flex, FA2 and cuDNN. Sparse: per pattern and
    N the milliseconds, the ratio against Flex, TFLOP/s and the mask build times (memattn's
    description, Flex's first and steady ``create_block_mask``).

    Args:
        dense, sparse: the ``dense`` / ``sparse`` rows of h200.json (scripts/gpu_triton.py).
    Returns:
        markdown text, the two tables separated by a blank line (a table without rows is left out).

    Example:
        >>> rows = [dict(kind="causal", N=4096, D=128, impl=i, fwd_ms=t, fwdbwd_ms=2 * t, status="ok",
        ...              fwd_tflops=100 / t, fwdbwd_tflops=80 / t) for i, t in (("memattn", 1.0), ("flex", 1.5))]
        >>> peer_tables_markdown(rows, []).splitlines()[2].split(" | ")[-3]
        '1.50 / 1.50'
    """
    def tf(r):
        return _pair(r.get("fwd_tflops"), r.get("fwdbwd_tflops"), "{:.0f}") if r else "–"

    def ratio(peer, ours):
        if not peer:
            return "–"
        return _pair(peer["fwd_ms"] / ours["fwd_ms"], peer["fwdbwd_ms"] / ours["fwdbwd_ms"], "{:.2f}") \
            if isinstance(peer.get("fwdbwd_ms"), (int, float)) else "–"

    parts = []
    rows = _by_case(dense)
    if rows:
        lines = ["| D | N | mask | memattn | SDPA flash (FA2) | SDPA cuDNN | FlexAttention | vs Flex | vs FA2 | "
                 "vs cuDNN |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (kind, n, d), im in sorted(rows, key=lambda x: (-x[0][2], x[0][1], x[0][0] != "full")):
            m = im["memattn"]
            lines.append(f"| {d} | {n} | {kind} | {tf(m)} | {tf(im.get('sdpa_flash'))} | {tf(im.get('sdpa_cudnn'))} | "
                         f"{tf(im.get('flex'))} | {ratio(im.get('flex'), m)} | {ratio(im.get('sdpa_flash'), m)} | "
                         f"{ratio(im.get('sdpa_cudnn'), m)} |")
        parts.append("\n".join(lines))
    rows = _by_case(sparse)
    if rows:
        lines = ["| pattern (B=1, H=16, D=128) | N | memattn ms | Flex ms | vs Flex | memattn TFLOP/s | Flex TFLOP/s | "
                 "mask build: memattn / Flex first / Flex steady |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (kind, n, d), im in rows:
            m, f = im["memattn"], im.get("flex")
            mb, fb = m.get("mask_build") or {}, (f or {}).get("mask_build") or {}
            path = (mb.get("info") or {}).get("path")
            build = f"{_ms_text(mb.get('first_s'))}{f' ({path})' if path else ''} / {_ms_text(fb.get('first_s'))} / " \
                    f"{_ms_text(fb.get('steady_s'))}"
            lines.append(f"| {_SPARSE_NAMES.get(kind, kind)} | {n} | {_pair(m['fwd_ms'], m['fwdbwd_ms'], '{:.2f}')} | "
                         f"{_pair(f['fwd_ms'], f['fwdbwd_ms'], '{:.2f}') if f else '–'} | {ratio(f, m)} | {tf(m)} | "
                         f"{tf(f)} | {build} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot_peer_ratios(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Horizontal bars of :func:`peer_ratios` rows, forward and forward+backward side by side,
    on a log axis with lines at parity, 1.2 (the sparse target against Flex) and 1.3 (the
    dense target against FlashAttention-2); written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(labels) + 1.6), sharey=True)
    height = 0.8 / len(_PEERS)
    colors = {"flex": "tab:blue", "sdpa_flash": "tab:orange", "sdpa_cudnn": "tab:gray"}
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for j, (peer, name) in enumerate(_PEERS):
            ys, xs = [], []
            for r in rows:
                if r["peer"] == peer:
                    ys.append(labels.index(r["label"]) + (j - 1) * height)
                    xs.append(r[key])
            ax.barh(ys, xs, height=height, color=colors[peer], label=name)
        ax.axvline(1.0, color="black", lw=1)
        ax.axvline(1.2, color="tab:blue", lw=1, ls="--")
        ax.axvline(1.3, color="tab:orange", lw=1, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(0.4, 4.5)
        ax.set_xticks([0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0])
        ax.set_xticklabels(["0.5", "0.75", "1", "1.2", "1.5", "2", "3", "4"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title)
        ax.set_xlabel("peer time / memattn time (> 1: memattn faster)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("memattn on one H200, bf16, peers in the same run. Lines: parity; dashed: 1.2× Flex (sparse target);"
                 " dotted: 1.3× FA2 (dense target)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
