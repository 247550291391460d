"""Where memattn stands against its peers on the H200, as one picture.

    .venv/bin/python scripts/plot_h200.py [--json benchmarks/h200.json] [--out benchmarks/h200_ratios.png]
        [--markdown tables.md]

Reads the ``dense`` and ``sparse`` sections of ``h200.json`` (written by
``scripts/gpu_triton.py``; every ratio is between rows of one run) and draws, per case, the
ratio peer time / memattn time (> 1: memattn faster) for the forward and the
forward+backward: against FlexAttention for every case, against SDPA's FlashAttention-2 and
cuDNN for the dense ones. Vertical lines mark parity and the issue's targets (≥ 1.0× Flex
dense, ≥ 1.2× Flex sparse, ≥ 1.3× FA2). With ``--markdown`` it also writes the dense and
sparse tables of ``docs/performance.md`` from the same rows. The functions live in
:mod:`memattn.bench.plots`; needs matplotlib (the ``cli`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memattn.bench.plots import peer_ratios, peer_tables_markdown, plot_peer_ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/h200.json"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/h200_ratios.png"))
    ap.add_argument("--markdown", type=Path, default=None, help="also write the dense and sparse tables here")
    a = ap.parse_args(argv)
    data = json.loads(a.json.read_text())
    rows = peer_ratios(data.get("dense", []), True) + peer_ratios(data.get("sparse", []), False)
    if not rows:
        raise SystemExit(f"{a.json}: no dense or sparse rows with memattn and a peer")
    plot_peer_ratios(rows, a.out)
    print(f"wrote {a.out} ({len(rows)} bars)")
    if a.markdown is not None:
        a.markdown.write_text(peer_tables_markdown(data.get("dense", []), data.get("sparse", [])) + "\n")
        print(f"wrote {a.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
