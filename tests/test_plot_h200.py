"""memattn.bench.plots.peer_ratios / plot_peer_ratios and scripts/plot_h200.py: ratios from a
gpu_triton.py JSON, and the picture."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from memattn.bench.plots import peer_ratios

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_h200", ROOT / "scripts" / "plot_h200.py")
plot_h200 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_h200)


def _row(kind, impl, fwd, fwdbwd, n=4096, d=128, status="ok"):
    return {"kind": kind, "N": n, "D": d, "impl": impl, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "status": status}


def test_ratios_are_peer_time_over_memattn_time_per_case():
    dense = [_row("causal", "memattn", 1.0, 4.0), _row("causal", "flex", 1.5, 3.0),
             _row("causal", "sdpa_flash", 2.0, 8.0), _row("causal", "sdpa_cudnn", 0.5, "OOM"),
             _row("full", "flex", 1.0, 1.0)]                      # no memattn row: no bars
    got = peer_ratios(dense, dense=True)
    assert [(r["peer"], r["fwd"], r["fwdbwd"]) for r in got] == [("flex", 1.5, 0.75), ("sdpa_flash", 2.0, 2.0)]
    assert got[0]["label"] == "D=128 N=4k causal"
    sparse = [_row("window1024", "memattn", 2.0, 5.0, n=65536), _row("window1024", "flex", 2.0, 4.0, n=65536),
              _row("bigbird", "memattn", 1.0, 1.0, n=65536, status="error"), _row("bigbird", "flex", 3.0, 3.0)]
    got = peer_ratios(sparse, dense=False)
    assert [(r["label"], r["fwd"], r["fwdbwd"]) for r in got] == [("causal window 1024 N=64k", 1.0, 0.8)]


def test_main_writes_the_picture_and_refuses_an_empty_file(tmp_path):
    src = tmp_path / "h200.json"
    src.write_text(json.dumps({"dense": [_row("full", "memattn", 1.0, 2.0), _row("full", "flex", 1.1, 1.9)]}))
    out = tmp_path / "ratios.png"
    assert plot_h200.main(["--json", str(src), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    src.write_text(json.dumps({"dense": []}))
    with pytest.raises(SystemExit, match="no dense or sparse rows"):
        plot_h200.main(["--json", str(src), "--out", str(out)])


def test_markdown_tables_hold_every_case_and_the_same_ratios():
    from memattn.bench.plots import peer_tables_markdown

    dense = [dict(_row("causal", "memattn", 1.0, 4.0), fwd_tflops=300.0, fwdbwd_tflops=200.0),
             dict(_row("causal", "flex", 1.5, 3.0), fwd_tflops=200.0, fwdbwd_tflops=266.7),
             dict(_row("causal", "sdpa_flash", 2.0, 8.0), fwd_tflops=150.0, fwdbwd_tflops=100.0)]
    sparse = [dict(_row("window1024", "memattn", 2.0, 5.0, n=65536), fwd_tflops=1.0, fwdbwd_tflops=2.0,
                   mask_build={"first_s": 0.0004, "info": {"path": "param"}}),
              dict(_row("window1024", "flex", 2.4, 6.0, n=65536), fwd_tflops=1.0, fwdbwd_tflops=2.0,
                   mask_build={"first_s": 2.5, "steady_s": 0.01})]
    text = peer_tables_markdown(dense, sparse)
    dense_t, sparse_t = text.split("\n\n")
    row = dense_t.splitlines()[2].split(" | ")
    assert row[0] == "| 128" and row[2] == "causal" and row[3] == "300 / 200"
    assert row[-3:] == ["1.50 / 0.75", "2.00 / 2.00", "– |"]          # vs Flex, vs FA2, no cuDNN row
    srow = sparse_t.splitlines()[2]
    assert "| causal window 1024 | 65536 | 2.00 / 5.00 | 2.40 / 6.00 | 1.20 / 1.20 |" in srow
    assert srow.endswith("| 0.4 ms (param) / 2500 ms / 10.0 ms |")
    assert peer_tables_markdown([], []) == ""


def test_main_writes_the_markdown_tables(tmp_path):
    src = tmp_path / "h200.json"
    src.write_text(json.dumps({"dense": [_row("full", "memattn", 1.0, 2.0), _row("full", "flex", 1.1, 1.9)]}))
    md = tmp_path / "tables.md"
    assert plot_h200.main(["--json", str(src), "--out", str(tmp_path / "r.png"), "--markdown", str(md)]) == 0
    assert md.read_text().count("\n| 128 | 4096 | full |") == 1
