"""memattn.eval.cli and memattn.eval.report: arguments, outputs, tables and plots."""

from __future__ import annotations

import json

import pytest

from memattn.eval import report
from memattn.eval.cli import SUITES, main
from memattn.eval.variants import DROPIN, LayerShape, by_name


@pytest.mark.parametrize("argv", (
    pytest.param(["--parts", "dropin,nonsense"], id="bad-part"),
    pytest.param(["--parts", ""], id="no-part"),
    pytest.param(["--device", "tpu"], id="bad-device"),
    pytest.param(["--threads", "0"], id="bad-threads"),
    pytest.param(["--suite", "huge"], id="bad-suite"),
))
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path)]) == 2


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--suite" in capsys.readouterr().out


def test_tasks_run_end_to_end_and_write_json_markdown_plot(tmp_path):
    rc = main(["--parts", "mqar,listops", "--mechanisms", "exact,linear", "--steps", "3", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "quality.json").read_text())
    assert res["meta"]["suite"] == "quick" and res["errors"] == []
    for task in ("mqar", "listops"):
        rows = res["tasks"][task]["rows"]
        assert [r["mechanism"] for r in rows] == ["exact", "linear"]
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 3 for r in rows)
    assert res["tasks"]["listops"]["chance"] == 0.1
    md = (tmp_path / "quality.md").read_text()
    assert "## MQAR" in md and "## ListOps" in md and "| exact |" in md
    assert (tmp_path / "tasks.png").stat().st_size > 1000


def test_unknown_mechanism_is_an_error_row(tmp_path):
    rc = main(["--parts", "mqar", "--mechanisms", "nonesuch", "--steps", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1
    res = json.loads((tmp_path / "quality.json").read_text())
    assert "nonesuch" in res["errors"][0]["error"]


def test_suites_cover_the_acceptance_settings():
    full = SUITES["full"]
    assert full.smol_variants is None and full.minilm_variants is None
    assert full.mqar_mechanisms is None and full.listops_mechanisms is None
    assert (full.mqar["seq_len"], full.mqar["num_pairs"]) == (256, 16) and full.mqar["vocab_size"] <= 8192
    assert full.mqar["layers"] == 2 and 64 <= full.mqar["d_model"] <= 128
    assert full.listops["max_len"] <= 1024 and full.smol_len == 2048
    names = {v.name for v in DROPIN}
    for need in ("window 64", "window 256", "window 1024", "window 64 + 4 sinks", "Longformer", "BigBird", "strided",
                 "Performer 64", "Performer 1024", "linear elu", "Nyström 64"):
        assert need in names
    assert set(SUITES["quick"].smol_variants) <= names and set(SUITES["quick"].minilm_variants) <= names


def test_decode_state_of_each_kind():
    shape = LayerShape(heads=9, kv_heads=3, head_dim=64, value_dim=64)
    exact, w64, sinks, lin, perf, nys = by_name(["exact", "window 64", "window 64 + 4 sinks", "linear elu",
                                                "Performer 256", "Nyström 64"])
    assert exact.decode_state(shape, 2048) == 3 * 2048 * 128
    assert w64.decode_state(shape, 2048) == 3 * 64 * 128
    assert w64.decode_state(shape, 10) == 3 * 10 * 128  # never more keys than exist
    assert sinks.decode_state(shape, 2048) == 3 * 68 * 128
    assert lin.decode_state(shape, 2048) == 3 * (64 * 64 + 64)
    assert perf.decode_state(shape, 2048) == 3 * (256 * 64 + 256)
    assert nys.decode_state(shape, 2048) is None and not nys.supports(True) and nys.supports(False)


def test_by_name_rejects_unknown():
    with pytest.raises(ValueError, match="unknown variant"):
        by_name(["window 7"])


def _synthetic_result():
    rows = [
        {"variant": "SDPA", "kind": "sdpa", "ppl": 10.0, "ppl_ratio": 1.0, "attn_mem_bytes": 2**20,
         "decode_state_bytes": 4 * 2**20},
        {"variant": "exact", "kind": "exact", "ppl": 10.0, "ppl_ratio": 1.0, "attn_mem_bytes": 2**20,
         "decode_state_bytes": 4 * 2**20},
        {"variant": "window 64", "kind": "pattern", "ppl": 30.0, "ppl_ratio": 3.0, "attn_mem_bytes": 2**20,
         "decode_state_bytes": 2**17},
        {"variant": "Nyström 64", "kind": "approx", "note": "not causal: cannot serve a decoder"},
    ]
    mini = [{"variant": "exact", "kind": "exact", "cos_mean": 1.0, "cos_min": 1.0, "attn_mem_bytes": 2**20},
            {"variant": "linear elu", "kind": "approx", "cos_mean": 0.5, "cos_min": 0.4, "attn_mem_bytes": 2**19}]
    return {"meta": {"suite": "quick", "device": "cpu", "wall_seconds": 1.0},
            "checks": [{"name": "c", "value": 1e-7, "target": "<= 1e-4", "pass": True}],
            "dropin": {"smollm2": {"play": "p", "seq_len": 2048, "num_seqs": 1, "rows": rows},
                       "minilm": {"play": "q", "num_passages": 2, "min_len": 3, "max_len": 9, "rows": mini}},
            "approx_error": {"M": {"layers": [0, 1], "n": 8, "errors": {"exact": [1e-7, 2e-7], "w": [None, 0.5]}}}}


def test_markdown_and_plots_from_a_result(tmp_path):
    res = _synthetic_result()
    p = report.plot_pareto(res, tmp_path / "p.png")
    e = report.plot_layer_errors(res["approx_error"]["M"], tmp_path / "e.png", "t")
    assert p.stat().st_size > 1000 and e.stat().st_size > 1000
    md = report.markdown(res, {"pareto": "p.png"})
    assert "| window 64 | 30.000 | 3.000 | 1.00 | 128 |" in md
    assert "not causal" in md and "![memory vs quality](p.png)" in md
    assert "| w | 0.5 | 0.5 | 0.5 |" in md
    out = report.write_json({"x": float("nan"), "y": [1.0, float("inf")]}, tmp_path / "r.json")
    assert json.loads(out.read_text()) == {"x": None, "y": [1.0, None]}
