"""Draw every memattn pattern's dense mask at N = 64 into docs/img/patterns/.

One PNG per pattern (``<name>.png``) and one titled grid of all (``all.png``).
Rows are queries, columns keys; a filled cell is an allowed pair.

Usage:
    .venv/bin/python scripts/draw_patterns.py [--n 64] [--out docs/img/patterns]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from memattn import patterns as P  # noqa: E402


def catalogue(n: int) -> list[tuple[str, str, P.Pattern, int]]:
    """(file name, title, pattern, head) for every pattern family, sized for an n x n picture."""
    layout = torch.zeros(n // 8, n // 8, dtype=torch.bool)
    for i in range(n // 8):
        layout[i, i] = True
        layout[i, (3 * i + 1) % (n // 8)] = True
        layout[i, 0] = True
    return [
        ("full", "full()", P.full(), 0),
        ("causal", "causal()", P.causal(), 0),
        ("sliding_window", "sliding_window(8)", P.sliding_window(8), 0),
        ("sliding_window_sym", "sliding_window(4, 4)", P.sliding_window(4, 4), 0),
        ("dilated", "dilated(24, 3)", P.dilated(24, 3), 0),
        ("strided", "strided(8, local=2) & causal()", P.strided(8, local=2) & P.causal(), 0),
        ("strided_primes", "strided(7, 11)", P.strided(7, 11), 0),
        ("fixed", "fixed(8, summary=2) & causal()", P.fixed(8, 2) & P.causal(), 0),
        ("exponential", "exponential(local=1) & causal()", P.exponential(1) & P.causal(), 0),
        ("random", "random(4, seed=0)", P.random(4), 0),
        ("global_tokens", "global_tokens([0, 1, 32])", P.global_tokens([0, 1, 32]), 0),
        ("longformer", "longformer(8, [0, 1])", P.longformer(8, [0, 1]), 0),
        ("bigbird", "bigbird(4, 3, 2, 2)", P.bigbird(4, 3, 2, 2), 0),
        ("document", "document([10, 20, 6, 28])", P.document([10, 20, 6, 28]), 0),
        ("document_causal", "document([10, 20, 6, 28]) & causal()", P.document([10, 20, 6, 28]) & P.causal(), 0),
        ("block_sparse", "block_sparse(layout 8x8, 8)", P.block_sparse(layout, 8), 0),
        ("mask_mod", "from_mask_mod(prefix_lm(16))", P.from_mask_mod(_prefix_lm), 0),
        ("window_or_global_causal", "(sliding_window(6) | global_tokens([0])) & causal()",
         (P.sliding_window(6) | P.global_tokens([0])) & P.causal(), 0),
        ("window_head0", "sliding_window((2, 12)), head 0", P.sliding_window((2, 12)), 0),
        ("window_head1", "sliding_window((2, 12)), head 1", P.sliding_window((2, 12)), 1),
    ]


def _prefix_lm(b, h, q, k):
    return (k <= q) | (k < 16)


def draw(ax, mask: torch.Tensor, title: str) -> None:
    ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    density = float(mask.float().mean())
    ax.set_xlabel(f"keys   (density {density:.2f})", fontsize=7)
    ax.set_ylabel("queries", fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img" / "patterns")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    items = catalogue(args.n)
    for name, title, p, head in items:
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        draw(ax, p.dense(args.n, args.n, head=head), title)
        fig.tight_layout()
        fig.savefig(args.out / f"{name}.png", dpi=110)
        plt.close(fig)
    cols = 5
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.3, rows * 3.8))
    for ax in axes.flat[len(items):]:
        ax.axis("off")
    for ax, (_, title, p, head) in zip(axes.flat, items):
        draw(ax, p.dense(args.n, args.n, head=head), title)
    fig.suptitle(f"memattn.patterns at N = {args.n} (rows: queries, columns: keys; filled = allowed)", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(args.out / "all.png", dpi=90)
    plt.close(fig)
    print(f"wrote {len(items) + 1} images to {args.out}")


if __name__ == "__main__":
    main()
