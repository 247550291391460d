"""Where memattn stands against its peers on the H200, as one picture.

    .venv/bin/python scripts/plot_h200.py [--json benchmarks/h200.json] [--out benchmarks/h200_ratios.png]

Reads the ``dense`` and ``sparse`` sections of ``h200.json`` (written by
``scripts/gpu_triton.py``; every ratio is between rows of one run) and draws, per case, the
ratio peer time / memattn time (> 1: memattn faster) for the forward and the
forward+backward: against FlexAttention for every case, against SDPA's FlashAttention-2 and
cuDNN for the dense ones. Vertical lines mark parity and the issue's targets (≥ 1.0× Flex
dense, ≥ 1.2× Flex sparse, ≥ 1.3× FA2). Needs matplotlib (the ``plots`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = (("flex", "FlexAttention"), ("sdpa_flash", "SDPA FlashAttention-2"), ("sdpa_cudnn", "SDPA cuDNN"))
SPARSE_NAMES = {"window1024": "causal window 1024", "documents16_causal": "16 causal documents",
                "bigbird": "BigBird", "longformer": "Longformer 512 + 16 globals"}


def ratios(section: list[dict], dense: bool) -> list[dict]:
    """One entry per (case, peer): label, peer, fwd and fwd+bwd ratio (peer ms / memattn ms)."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in section:
        if r.get("status") == "ok" and isinstance(r.get("fwd_ms"), (int, float)):
            by_case.setdefault((r["kind"], r["N"], r["D"]), {})[r["impl"]] = r
    out = []
    for (kind, n, d), impls in by_case.items():
        ours = impls.get("memattn")
        if ours is None:
            continue
        n_txt = f"{n // 1024}k"
        label = f"D={d} N={n_txt} {kind}" if dense else f"{SPARSE_NAMES.get(kind, kind)} N={n_txt}"
        for peer, _ in PEERS:
            p = impls.get(peer)
            if p is None or not isinstance(p.get("fwdbwd_ms"), (int, float)):
                continue
            out.append({"label": label, "peer": peer, "fwd": p["fwd_ms"] / ours["fwd_ms"],
                        "fwdbwd": p["fwdbwd_ms"] / ours["fwdbwd_ms"], "dense": dense})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(labels) + 1.6), sharey=True)
    height = 0.8 / len(PEERS)
    colors = {"flex": "tab:blue", "sdpa_flash": "tab:orange", "sdpa_cudnn": "tab:gray"}
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for j, (peer, name) in enumerate(PEERS):
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/h200.json"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/h200_ratios.png"))
    a = ap.parse_args(argv)
    data = json.loads(a.json.read_text())
    rows = ratios(data.get("dense", []), True) + ratios(data.get("sparse", []), False)
    if not rows:
        raise SystemExit(f"{a.json}: no dense or sparse rows with memattn and a peer")
    plot(rows, a.out)
    print(f"wrote {a.out} ({len(rows)} bars)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
