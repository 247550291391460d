"""Reporting of ``memattn eval``: JSON, a Markdown page and plots (Pareto frontier marked).

Units: MiB = 2**20 bytes, KiB = 2**10 bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["pareto_front", "write_json", "markdown", "plot_pareto", "plot_layer_errors", "plot_tasks"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both minimised), by memory.

    A point is on the front when no other point has memory <= and error <= with one of
    them strictly smaller.

    Args:
        points: (memory, error) pairs; NaN or None entries are ignored.
    Returns:
        indices of the front, sorted by memory.

    Example:
        >>> pareto_front([(1, 5), (2, 3), (3, 4), (4, 1)])
        [0, 1, 3]
    """
    ok = [i for i, (m, e) in enumerate(points)
          if m is not None and e is not None and not (math.isnan(m) or math.isnan(e))]
    front = []
    for i in ok:
        mi, ei = points[i]
        dominated = any((points[j][0] <= mi and points[j][1] <= ei) and (points[j][0] < mi or points[j][1] < ei)
                        for j in ok if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write the result dict as indented JSON (NaN → null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=1, sort_keys=False) + "\n")
    return path


def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return format(x, spec)
    return str(x)


def _cell(text: Any) -> str:
    """Table cell text: a '|' would end the cell."""
    return str(text).replace("|", "\\|")


def _mib(b: Any) -> str:
    return "—" if b is None else f"{b / 2**20:.2f}"


def _kib(b: Any) -> str:
    return "—" if b is None else f"{b / 2**10:,.0f}"


def markdown(result: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """The Markdown report: drop-in tables, approximation errors, task accuracies, checks."""
    plots = plots or {}
    meta = result.get("meta", {})
    out = [f"# memattn eval — suite `{meta.get('suite')}`", "",
           f"Device {meta.get('device')} ({meta.get('device_name', '')}), torch {meta.get('torch')}, "
           f"transformers {meta.get('transformers')}, {meta.get('threads')} threads, "
           f"wall time {_fmt(meta.get('wall_seconds'), '.0f')} s. MiB = 2**20 bytes.", ""]
    checks = result.get("checks")
    if checks:
        out += ["## Checks (exact memattn against SDPA)", "", "| check | value | target | pass |", "| --- | --- | --- | --- |"]
        for c in checks:
            v = c["value"]
            spec = ".15g" if isinstance(v, float) and abs(v) >= 0.01 else ".3g"
            out.append(f"| {_cell(c['name'])} | {_fmt(v, spec)} | {_cell(c['target'])} | {'yes' if c['pass'] else 'NO'} |")
        out.append("")
    d = result.get("dropin", {})
    if "smollm2" in d:
        s = d["smollm2"]
        out += ["## Drop-in: SmolLM2-135M perplexity (no fine-tuning)", "",
                f"{s['num_seqs']} × {s['seq_len']} tokens of `{s['play']}`; attention memory: peak of one "
                f"attention call on layer {s.get('memory_layer')}'s inputs (B=1, N={s['seq_len']}, "
                f"{s.get('heads')} query / {s.get('kv_heads')} KV heads, D={s.get('head_dim')}); decode state: "
                "what one layer keeps to generate the next token at N (float32).", "",
                "| variant | perplexity | × exact | attention memory (MiB) | decode state (KiB / layer) | note |",
                "| --- | --- | --- | --- | --- | --- |"]
        for r in s["rows"]:
            note = r.get("note", "") or r.get("error", "")
            out.append(f"| {r['variant']} | {_fmt(r.get('ppl'), '.3f')} | {_fmt(r.get('ppl_ratio'), '.3f')} | "
                       f"{_mib(r.get('attn_mem_bytes'))} | {_kib(r.get('decode_state_bytes'))} | {_cell(note)} |")
        out.append("")
    if "minilm" in d:
        s = d["minilm"]
        out += ["## Drop-in: all-MiniLM-L6-v2 sentence embeddings (no fine-tuning)", "",
                f"{s['num_passages']} passages of `{s['play']}`, {s['min_len']}–{s['max_len']} tokens, one padded "
                "batch; cosine to the exact model's embedding (SDPA); attention memory: one attention call on "
                f"layer {s.get('memory_layer')}'s inputs for the longest passage (N={s.get('memory_n')}).", "",
                "| variant | mean cosine | min cosine | attention memory (MiB) | note |", "| --- | --- | --- | --- | --- |"]
        for r in s["rows"]:
            note = r.get("note", "") or r.get("error", "")
            out.append(f"| {r['variant']} | {_fmt(r.get('cos_mean'), '.6f')} | {_fmt(r.get('cos_min'), '.6f')} | "
                       f"{_mib(r.get('attn_mem_bytes'))} | {_cell(note)} |")
        out.append("")
    if "pareto" in plots:
        out += [f"![memory vs quality]({plots['pareto']})", "",
                "Pareto frontier (no other variant has both less memory and better quality) marked.", ""]
    e = result.get("approx_error", {})
    for model, s in e.items():
        layers = s["layers"]
        out += [f"## Approximation error on real inputs: {model}", "",
                f"Relative error ‖o − o*‖/‖o*‖ of one attention call against exact attention (float64) under the "
                f"model's mask, on q, k, v captured at layers {layers} (N={s.get('n')}).", "",
                "| variant | mean | min | max |", "| --- | --- | --- | --- |"]
        for name, errs in s["errors"].items():
            vals = [x for x in errs if x is not None]
            if not vals:
                out.append(f"| {name} | — | — | — |")
                continue
            out.append(f"| {name} | {sum(vals) / len(vals):.3g} | {min(vals):.3g} | {max(vals):.3g} |")
        out.append("")
        if f"errors_{model}" in plots:
            out += [f"![errors per layer]({plots[f'errors_{model}']})", ""]
    t = result.get("tasks", {})
    if "mqar" in t:
        s = t["mqar"]
        c = s["config"]
        out += ["## MQAR (multi-query associative recall)", "",
                f"L={c['seq_len']}, {c['num_pairs']} key-value pairs, vocabulary {c['vocab_size']}; {c['layers']}-layer "
                f"model, d_model {c['d_model']}, {c['num_heads']} heads, {c['steps']} steps × batch {c['batch_size']}, "
                f"lr {c['lr']}; accuracy at query positions of {c['test_examples']} held-out examples.", "",
                "| mechanism | accuracy | mode | options | train s |", "| --- | --- | --- | --- | --- |"]
        for r in s["rows"]:
            out.append(f"| {r['mechanism']} | {_fmt(r.get('accuracy'), '.3f')} | "
                       f"{'causal' if r.get('causal') else 'bidirectional' if 'causal' in r else '—'} | "
                       f"{_opts(r.get('options'))} | {_fmt(r.get('seconds'), '.0f')} |{' ' + _cell(r['error']) if 'error' in r else ''}")
        out.append("")
    if "listops" in t:
        s = t["listops"]
        c = s["config"]
        out += ["## ListOps (shortened)", "",
                f"{c['min_len']}–{c['max_len']} tokens, {c['train_examples']} training / {c['test_examples']} test "
                f"expressions; {c['layers']}-layer model, d_model {c['d_model']}, {c['steps']} steps × batch "
                f"{c['batch_size']}; chance 10%, majority class {_fmt(s.get('majority'), '.1%')} of the test set.", "",
                "| mechanism | accuracy | options | train s |", "| --- | --- | --- | --- |"]
        for r in s["rows"]:
            out.append(f"| {r['mechanism']} | {_fmt(r.get('accuracy'), '.3f')} | {_opts(r.get('options'))} | "
                       f"{_fmt(r.get('seconds'), '.0f')} |{' ' + _cell(r['error']) if 'error' in r else ''}")
        out.append("")
    if "tasks" in plots:
        out += [f"![task accuracy]({plots['tasks']})", ""]
    return "\n".join(out)


def _opts(o: Any) -> str:
    if not o:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in o.items())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(result: dict[str, Any], path: str | Path) -> Path | None:
    """Memory vs quality with the Pareto frontier: SmolLM2 (decode state vs perplexity) and
    MiniLM (attention memory vs 1 − cosine). Returns the path, or None without data."""
    d = result.get("dropin", {})
    panels = []
    if "smollm2" in d:
        # SDPA keeps the same cache as exact: plotted once, as "exact"
        rows = [r for r in d["smollm2"]["rows"] if r.get("ppl") and r.get("decode_state_bytes") and r["kind"] != "sdpa"]
        panels.append(("SmolLM2-135M, N = %d" % d["smollm2"]["seq_len"], "decode state per layer (KiB)",
                       "perplexity", [(r["decode_state_bytes"] / 2**10, r["ppl"], r["variant"]) for r in rows]))
    if "minilm" in d:
        rows = [r for r in d["minilm"]["rows"] if r.get("cos_mean") is not None and r.get("attn_mem_bytes")]
        panels.append(("all-MiniLM-L6-v2", "attention memory of one call (MiB)", "1 − cosine to exact",
                       [(r["attn_mem_bytes"] / 2**20, max(1e-12, 1 - r["cos_mean"]), r["variant"]) for r in rows]))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, xl, yl, pts) in zip(axes, panels):
        front = set(pareto_front([(p[0], p[1]) for p in pts]))
        for i, (x, y, name) in enumerate(pts):
            on = i in front
            ax.scatter([x], [y], s=50 if on else 25, color="C3" if on else "C0", zorder=3)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        fp = sorted((pts[i][0], pts[i][1]) for i in front)
        if fp:
            ax.step([p[0] for p in fp], [p[1] for p in fp], where="post", color="C3", lw=1.2, label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_errors(errors: dict[str, Any], path: str | Path, title: str) -> Path | None:
    """Relative error per layer, one line per variant (log scale)."""
    layers = errors.get("layers") or []
    if not layers:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, errs) in enumerate(errors["errors"].items()):
        xs = [l for l, e in zip(layers, errs) if e is not None and e > 0]
        ys = [e for e in errs if e is not None and e > 0]
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=name, color=f"C{i % 10}", ls="-" if i < 10 else "--")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error ‖o − o*‖ / ‖o*‖")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tasks(tasks: dict[str, Any], path: str | Path) -> Path | None:
    """Accuracy per mechanism, one panel per task (chance level drawn)."""
    names = [t for t in ("mqar", "listops") if t in tasks]
    if not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4.5))
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, t in zip(axes, names):
        rows = tasks[t]["rows"]
        labels = [r["mechanism"] for r in rows]
        acc = [r.get("accuracy") or 0.0 for r in rows]
        ax.bar(range(len(rows)), acc, color=["C2" if r.get("accuracy") is not None else "C7" for r in rows])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        if t == "listops":
            ax.axhline(0.1, color="k", ls=":", lw=1, label="chance 10%")
            if tasks[t].get("majority") is not None:
                ax.axhline(tasks[t]["majority"], color="C1", ls="--", lw=1, label="majority class")
            ax.legend(fontsize=8)
        ax.set_title("MQAR" if t == "mqar" else "ListOps (shortened)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
