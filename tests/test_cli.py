"""The memattn console script: argument errors, outputs, the OOM row, the JSON schema."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

from memattn import cli
from memattn.bench.report import ROW_FIELDS, SCHEMA, STATUSES, validate_payload

ARG_ERRORS = (
    ("no_command", []),
    ("unknown_command", ["frobnicate"]),
    ("unknown_suite", ["bench", "--suite", "nope"]),
    ("suite_and_impl", ["bench", "--suite", "quick", "--impl", "naive"]),
    ("unknown_impl", ["bench", "--impl", "warp-drive"]),
    ("bad_budget_unit", ["bench", "--budget", "12XB"]),
    ("zero_n", ["bench", "--impl", "naive", "--n", "0"]),
    ("bad_dtype", ["bench", "--impl", "naive", "--dtype", "int8"]),
    ("bad_kv_heads", ["bench", "--impl", "naive", "--heads", "4", "--kv-heads", "3"]),
    ("negative_seconds", ["bench", "--max-seconds", "-1"]),
    ("max_n_without_budget", ["memory", "--max-n"]),
    ("unknown_mechanism", ["memory", "--mechanisms", "magic"]),
    ("demo_bad_n", ["demo", "--n", "x"]),
)


@pytest.mark.parametrize("name,argv", ARG_ERRORS, ids=[a[0] for a in ARG_ERRORS])
def test_argument_errors_exit_2(name, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_requested_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cuda", "--suite", "anchors"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_help_states_units_and_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["memory", "--help"])
    text = capsys.readouterr().out
    assert "RLIMIT_AS" in text and "fresh subprocess" in text and "bisects" in text


def test_list_suite(capsys):
    assert cli.main(["bench", "--suite", "quick", "--device", "cpu", "--list"]) == 0
    out = capsys.readouterr().out
    assert "naive" in out and "cases" in out


def test_bench_custom_writes_table_json_csv_plots(tmp_path, capsys):
    out = tmp_path / "b"
    rc = cli.main(["bench", "--impl", "naive", "sdpa", "memattn", "--backend", "reference", "--n", "64", "128",
                   "--d", "16", "--heads", "2", "--max-seconds", "0.01", "--in-process", "--no-progress",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "memattn[reference]" in text and "f+b ms" in text
    payload = json.loads((out / "bench.json").read_text())
    validate_payload(payload)
    assert payload["schema"] == SCHEMA
    assert len(payload["rows"]) == 6 and all(r["status"] == "ok" for r in payload["rows"])
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_peak_mib"] is not None for r in payload["rows"])
    assert payload["meta"]["device"] == "cpu" and "torch" in payload["meta"]
    assert (out / "bench.csv").read_text().splitlines()[0].split(",") == list(ROW_FIELDS)
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert len(pngs) == 2 and pngs[0].startswith("memory_") and pngs[1].startswith("time_")


def test_bench_tiny_budget_gives_oom_rows_not_a_crash(tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["bench", "--impl", "naive", "--n", "1024", "2048", "--d", "16", "--heads", "2",
                   "--budget", "1KiB", "--max-seconds", "0.01", "--no-progress", "--no-plots", "--device", "cpu",
                   "--out", str(out)])
    assert rc == 0
    assert "OOM" in capsys.readouterr().out
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["oom", "skipped"]
    assert rows[0]["fwd_ms"] is None and "budget" in rows[0]["reason"]


def test_json_schema_statuses_are_closed():
    assert set(STATUSES) == {"ok", "oom", "unsupported", "unavailable", "failed-check", "skipped", "error"}


@pytest.mark.slow
def test_memory_sweep_and_exponents(tmp_path, capsys):
    out = tmp_path / "m"
    rc = cli.main(["memory", "--mechanisms", "naive", "--n", "512", "1024", "2048", "--naive-heads", "2",
                   "--d", "16", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "growth exponent" in text and "inputs" in text
    payload = json.loads((out / "memory.json").read_text())
    assert payload["schema"] == "memattn.memory/1"
    assert [r["status"] for r in payload["rows"]] == ["ok"] * 3
    fit = next(f for f in payload["fits"] if f["mechanism"] == "naive" and f["pass"] == "fwd+bwd")
    assert fit["slope"] == pytest.approx(2.0, abs=0.3)  # scores dominate even at these sizes
    assert (out / "memory_scaling.png").stat().st_size > 10_000


@pytest.mark.slow
def test_memory_max_n_by_measurement(tmp_path, capsys):
    out = tmp_path / "x"
    rc = cli.main(["memory", "--max-n", "--budget", "48MiB", "--mechanisms", "naive", "--heads", "2", "--d", "16",
                   "--start", "256", "--tolerance", "1.0", "--no-progress", "--out", str(out)])
    assert rc == 0
    assert "largest N within a budget of 48.00 MiB" in capsys.readouterr().out
    res = json.loads((out / "memory_max_n.json").read_text())["results"]["naive"]
    assert res["max_n"] is not None and res["first_miss"] > res["max_n"]
    fits = [p for p in res["probes"] if p["fits"]]
    assert all(p["peak"] <= 48 * 2**20 for p in fits)
    assert any(not p["fits"] for p in res["probes"])
    # naive needs several score arrays of 2·N²·4 bytes (8 MiB at N=1024) for forward+backward
    assert 256 <= res["max_n"] <= 1024
    assert [p["n"] for p in res["probes"]][:2] == [256, 512]  # doubling from --start


@pytest.mark.slow
def test_demo_small(tmp_path, capsys):
    out = tmp_path / "d"
    rc = cli.main(["demo", "--n", "256", "512", "--naive-max", "256", "--heads", "2", "--max-seconds", "0.01",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "naive capped at N=256" in text
    payload = json.loads((out / "demo.json").read_text())
    validate_payload(payload)
    by = {(r["impl"], r["pattern"], r["n"]): r for r in payload["rows"]}
    assert by[("naive", None, 512)]["status"] == "skipped"
    assert by[("sdpa", None, 512)]["status"] == "ok"
    assert by[("memattn", "sliding_window:512", 512)]["status"] in STATUSES
    assert by[("linear", None, 256)]["status"] in ("ok", "unavailable")
    assert any(p.startswith("demo_time_") for p in os.listdir(out))


def test_eval_dispatches_to_memattn_eval(monkeypatch):
    seen = {}
    fake = types.ModuleType("memattn.eval.cli")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "memattn.eval.cli", fake)
    assert cli.main(["eval", "--suite", "quick"]) == 0
    assert seen["argv"] == ["--suite", "quick"]


def test_eval_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "memattn.eval.cli", None)  # import raises ImportError
    assert cli.main(["eval"]) == 2
    assert "memattn eval" in capsys.readouterr().err


def test_readme_examples_run():
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 4
    ns: dict = {}
    for block in blocks:  # the tour's blocks build on each other
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["out"].shape == (2, 8, 1000, 64) and ns["y"].shape == (2, 1000, 512)


def test_readme_opens_with_the_two_commands():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        head = f.read(400)
    assert "make demo" in head and "make test" in head
