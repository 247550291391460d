"""memattn.bench: registry, work counts, the quick check, runner rows, memory, reports, plots."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

import memattn
from memattn.bench import budget as bud
from memattn.bench import peers
from memattn.bench.cases import ANCHORS, Case, anchor_for, format_size, parse_pattern, parse_size, suite
from memattn.bench.check import quick_check
from memattn.bench.memory import Meter, predict
from memattn.bench.report import ROW_FIELDS, SCHEMA, format_table, validate_payload, write_csv, write_json
from memattn.bench.runner import RunOptions, run_case, run_cases
from memattn.bench.timing import allowed_pairs, fit_slope, flops, kv_bytes, time_ms

SIZES = (
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096), ("8G", 8 * 2**30),
    ("3 KiB", 3 * 1024), ("10MB", 10**7),
)


@pytest.mark.parametrize("text,expected", SIZES, ids=[s[0] for s in SIZES])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


BAD_SIZES = ("", "GiB", "-1GiB", "0", "2XB", "1.2.3MiB")


@pytest.mark.parametrize("text", BAD_SIZES, ids=[repr(s) for s in BAD_SIZES])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_binary_units():
    assert format_size(3 * 2**29) == "1.50 GiB"
    assert format_size(2**20) == "1.00 MiB"
    assert format_size(12) == "12 B"


def test_parse_pattern():
    assert parse_pattern("sliding_window:1024").args == (1024,)
    assert parse_pattern("sliding_window:8,2").args == (8, 2)
    assert parse_pattern(None) is None and parse_pattern("full") is None
    with pytest.raises(ValueError, match="integers"):
        parse_pattern("sliding_window:abc")
    with pytest.raises(ValueError, match="identifier"):
        parse_pattern("9bad")


CASE_ERRORS = (
    ("n", dict(impl="naive", n=0)),
    ("nq", dict(impl="naive", n=8, nq=9)),
    ("kv_heads", dict(impl="naive", n=8, heads=4, kv_heads=3)),
    ("dtype", dict(impl="naive", n=8, dtype="int8")),
    ("device", dict(impl="naive", n=8, device="tpu")),
    ("passes", dict(impl="naive", n=8, passes=("bwd",))),
)


@pytest.mark.parametrize("field,kw", CASE_ERRORS, ids=[c[0] for c in CASE_ERRORS])
def test_case_validation_names_the_field(field, kw):
    with pytest.raises(ValueError, match=field):
        Case(**kw)


def test_case_roundtrip_dict():
    c = Case("memattn", 128, d=32, heads=4, kv_heads=2, causal=True, pattern="sliding_window:16", nq=64)
    assert Case.from_dict(json.loads(json.dumps(c.to_dict()))) == c


# ------------------------------------------------------------------------- work counts
PAIR_CASES = (("full", 7, 11, False), ("causal_square", 9, 9, True), ("causal_nq_lt_nk", 5, 13, True),
              ("decode", 1, 10, True))


@pytest.mark.parametrize("name,nq,nk,causal", PAIR_CASES, ids=[p[0] for p in PAIR_CASES])
def test_allowed_pairs_matches_dense_count(name, nq, nk, causal):
    c = Case("naive", nk, nq=nq, causal=causal)
    dense = torch.ones(nq, nk, dtype=torch.bool)
    if causal and nq > 1:
        dense = dense.tril(diagonal=nk - nq)
    assert allowed_pairs(c) == float(dense.sum())


def test_allowed_pairs_of_a_pattern_counts_its_dense_mask():
    c = Case("naive", 300, causal=True, pattern="sliding_window:37")
    dense = memattn.patterns.sliding_window(37).dense(300, 300) & memattn.patterns.causal().dense(300, 300)
    assert allowed_pairs(c) == pytest.approx(float(dense.sum()))


def test_flops_factors():
    c = Case("naive", 64, d=16, heads=3, batch=2)
    fwd = 4 * 2 * 3 * 64 * 64 * 16
    assert flops(c, "fwd") == fwd
    assert flops(c, "bwd") == 2.5 * fwd
    assert flops(c, "fwd+bwd") == 3.5 * fwd
    with pytest.raises(ValueError, match="which"):
        flops(c, "both")


def test_kv_bytes():
    c = Case("sdpa", 1000, d=128, heads=32, kv_heads=8, batch=2, nq=1, dtype="bfloat16")
    assert kv_bytes(c) == 2 * 2 * 8 * 1000 * 128 * 2


def test_fit_slope_recovers_exponents():
    ns = [1024, 2048, 4096, 8192]
    assert fit_slope(ns, [3 * n for n in ns]) == pytest.approx(1.0)
    assert fit_slope(ns, [n * n / 7 for n in ns]) == pytest.approx(2.0)
    assert fit_slope([1], [1]) is None


def test_growth_exponent_separates_a_constant():
    ns = [1024, 2048, 4096, 8192, 16384]
    ys = [50.0 + 0.01 * n for n in ns]
    assert fit_slope(ns, ys) < 0.85  # the plain slope is bent by the constant
    assert bud.growth_exponent(ns, ys) == pytest.approx(1.0, abs=0.02)
    assert bud.growth_exponent(ns, [1e-6 * n * n for n in ns]) == pytest.approx(2.0, abs=0.02)


def test_time_ms_cpu_counts_samples():
    calls = []
    ms = time_ms(lambda: calls.append(1), "cpu", max_seconds=10.0, max_reps=3, samples=[1.0])
    assert len(calls) == 2 and ms >= 0
    with pytest.raises(ValueError, match="device"):
        time_ms(lambda: None, "tpu")


# ------------------------------------------------------------------------ quick check
def _reference_out(c: Case, q, k, v):
    pat = c.pattern_spec.build(c.n) if c.pattern_spec else None
    return memattn.attention(q, k, v, causal=c.causal, pattern=pat, backend="reference")


CHECK_CASES = (
    ("causal", Case("naive", 100, d=16, heads=2, causal=True)),
    ("gqa_nq_lt_nk", Case("naive", 90, d=8, heads=4, kv_heads=2, nq=40, causal=True)),
    ("window", Case("naive", 130, d=16, heads=2, causal=True, pattern="sliding_window:9")),
    ("half", Case("naive", 64, d=16, heads=2, causal=True, dtype="float16")),
)


@pytest.mark.parametrize("name,case", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_quick_check_accepts_the_reference_and_rejects_a_wrong_mask(name, case):
    q, k, v = peers.make_inputs(case)
    good = quick_check(case, q, k, v, _reference_out(case, q, k, v))
    assert good.passed, good
    # top-left causal alignment (a classic bug) or no mask at all must fail
    wrong = memattn.attention(q, k, v, causal=False, backend="reference")
    bad = quick_check(case, q, k, v, wrong)
    assert not bad.passed and bad.err > bad.tol


def test_quick_check_rejects_nan_and_shape():
    c = Case("naive", 32, d=8, heads=2)
    q, k, v = peers.make_inputs(c)
    out = _reference_out(c, q, k, v)
    assert not quick_check(c, q, k, v, out[:, :, :-1]).passed
    out[0, 0, -1, 0] = float("nan")
    assert quick_check(c, q, k, v, out).detail == "non-finite output"


def test_quick_check_linear_closed_form():
    c = Case("linear", 50, d=8, heads=2, causal=True)
    q, k, v = peers.make_inputs(c)
    fq, fk = torch.nn.functional.elu(q.double()) + 1, torch.nn.functional.elu(k.double()) + 1
    a = (fq @ fk.transpose(-1, -2)).tril()
    out = ((a @ v.double()) / a.sum(-1, keepdim=True)).float()
    assert quick_check(c, q, k, v, out, "linear-elu").passed
    assert not quick_check(c, q, k, v, out + 0.1, "linear-elu").passed


# ------------------------------------------------------------------------------ peers
def test_naive_and_sdpa_agree_with_reference_on_cpu():
    c = Case("naive", 70, d=16, heads=4, kv_heads=2, nq=30, causal=True, pattern="sliding_window:20")
    q, k, v = peers.make_inputs(c)
    ref = _reference_out(c, q, k, v)
    for impl in ("naive", "sdpa", "memattn"):
        cc = Case(**{**c.to_dict(), "impl": impl, "passes": c.passes, "backend": "reference"})
        out = peers.prepare(cc, q, k, v).fn()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prepare_rejects_unknown_and_cuda_only():
    c = Case("naive", 16)
    q, k, v = peers.make_inputs(c)
    with pytest.raises(ValueError, match="impl"):
        peers.prepare(Case("nope", 16), q, k, v)
    with pytest.raises(peers.Unsupported):
        peers.prepare(Case("sdpa-flash", 16), q, k, v)


# ------------------------------------------------------------------------------ rows
def test_run_case_ok_row_has_times_and_memory():
    c = Case("naive", 256, d=16, heads=2, causal=True)
    r = run_case(c, RunOptions(max_seconds=0.05))
    assert r["status"] == "ok", r["reason"]
    assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
    assert r["fwd_tflops"] == pytest.approx(flops(c, "fwd") / (r["fwd_ms"] * 1e-3) / 1e12)
    # naive materialises a 2 x 256 x 256 float32 score array at least: 0.5 MiB
    assert r["fwd_peak_mib"] >= 0.5 and r["fwdbwd_peak_mib"] >= 0.5
    assert r["check_err"] <= r["check_tol"]


def test_run_case_failed_check_reports_no_speed(monkeypatch):
    def broken(case, q, k, v):
        return peers.Prepared(lambda: torch.zeros(case.batch, case.heads, case.q_len, case.d))
    monkeypatch.setitem(peers.IMPLS, "broken", peers.Impl("broken", "broken", True, broken))
    r = run_case(Case("broken", 64, d=8, heads=2), RunOptions(max_seconds=0.05))
    assert r["status"] == "failed-check"
    assert r["fwd_ms"] is None and r["fwdbwd_ms"] is None and r["fwd_peak_mib"] is None


def test_run_case_unavailable_and_unsupported_rows(monkeypatch):
    def missing(case, q, k, v):
        raise peers.Unavailable("not installed")
    monkeypatch.setitem(peers.IMPLS, "missing", peers.Impl("missing", "missing", True, missing))
    r = run_case(Case("missing", 32, d=8, heads=1))
    assert r["status"] == "unavailable" and "not installed" in r["reason"]
    r = run_case(Case("flex", 32, d=8, heads=1))
    assert r["status"] == "unsupported"


def test_run_cases_in_process_budget_marks_oom_and_stops_growth():
    cases = [Case("naive", n, d=8, heads=1, causal=True, passes=("fwd",)) for n in (512, 1024)]
    rows = run_cases(cases, RunOptions(max_seconds=0.02, budget=4096, isolate=False))
    assert [r["status"] for r in rows] == ["oom", "skipped"]
    assert rows[0]["fwd_ms"] is None
    assert "N=512" in rows[1]["reason"]


def test_run_cases_worker_watchdog_oom_row():
    # 1 KiB budget: the worker's watchdog stops it during the first case
    cases = [Case("naive", 2048, d=16, heads=2, causal=True), Case("naive", 4096, d=16, heads=2, causal=True)]
    rows = run_cases(cases, RunOptions(max_seconds=0.02, budget=1024))
    assert rows[0]["status"] == "oom", rows[0]["reason"]
    assert rows[1]["status"] == "skipped"


# ----------------------------------------------------------------------------- memory
def test_meter_sees_an_allocation():
    m = Meter("cpu")
    base = m.start()
    x = torch.ones(2**23)  # 32 MiB, touched
    grown = m.peak() - base
    del x
    assert grown >= 31 * 2**20


def test_predict_naive_quadratic_memattn_linear():
    p1, p2 = predict(Case("naive", 2048, heads=2)), predict(Case("naive", 4096, heads=2))
    assert p2["train_peak"] / p1["train_peak"] == pytest.approx(4.0, rel=0.05)
    m1, m2 = predict(Case("memattn", 2**16, heads=8)), predict(Case("memattn", 2**17, heads=8))
    assert m2["train_peak"] / m1["train_peak"] == pytest.approx(2.0, rel=0.05)
    assert predict(Case("memattn", 4096, pattern="sliding_window:64"))["block_map"] > 0


def test_measure_breakdown_categories_add_up():
    from memattn.bench.memory import measure_breakdown

    r = measure_breakdown(Case("naive", 1024, d=16, heads=2, causal=True))
    assert r["status"] == "ok", r
    score = 2 * 1024 * 1024 * 4
    assert r["fwd_peak"] >= score  # at least one score array
    assert r["train_peak"] >= r["grads"] > 0
    assert r["inputs"] >= 0.9 * 4 * 2 * 1024 * 16 * 4  # q, k, v, dout


# ----------------------------------------------------------------------------- report
def _rows():
    ok = run_case(Case("sdpa", 128, d=8, heads=2, causal=True, passes=("fwd",)), RunOptions(max_seconds=0.02))
    from memattn.bench.runner import base_row

    oom = base_row(Case("naive", 1 << 20, d=8, heads=2))
    oom.update(status="oom", reason="too big")
    return [ok, oom]


def test_table_json_csv(tmp_path):
    rows = _rows()
    text = format_table(rows)
    assert "SDPA" in text and "OOM: too big" in text and "MiB" in text
    path = tmp_path / "b.json"
    write_json(str(path), rows, {"command": "test"}, [])
    payload = json.loads(path.read_text())
    assert payload["schema"] == SCHEMA
    validate_payload(payload)
    assert all(set(ROW_FIELDS) <= set(r) for r in payload["rows"])
    write_csv(str(tmp_path / "b.csv"), rows)
    with open(tmp_path / "b.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == list(ROW_FIELDS) and got[1]["status"] == "oom"


def test_validate_payload_rejects_bad_rows():
    rows = _rows()
    payload = {"schema": SCHEMA, "meta": {}, "rows": [{k: rows[0].get(k) for k in ROW_FIELDS}], "fits": []}
    validate_payload(payload)
    bad = json.loads(json.dumps(payload))
    bad["rows"][0]["status"] = "fine"
    with pytest.raises(ValueError, match="status"):
        validate_payload(bad)
    bad = json.loads(json.dumps(payload))
    del bad["rows"][0]["fwd_ms"]
    with pytest.raises(ValueError, match="fwd_ms"):
        validate_payload(bad)
    bad = json.loads(json.dumps(payload))
    bad["rows"][0]["status"] = "oom"
    with pytest.raises(ValueError, match="carries a time"):
        validate_payload(bad)


def test_plots_written(tmp_path):
    from memattn.bench.plots import fit_series, plot_scaling

    rows = []
    for n, t in ((256, 1.0), (512, 4.0), (1024, 16.0)):
        r = run_case(Case("naive", n, d=8, heads=1, passes=("fwd",)), RunOptions(max_seconds=0.01))
        r["fwd_ms"] = t  # exact synthetic times: the fitted slope must be 2
        rows.append(r)
    paths = plot_scaling(rows, str(tmp_path))
    assert sorted(os.path.basename(p).split("_")[0] for p in paths) == ["memory", "time"]
    assert all(os.path.getsize(p) > 10_000 for p in paths)
    fits = [f for f in fit_series(rows) if f["quantity"] == "fwd_ms"]
    assert fits[0]["slope"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------- suites
def test_quick_suite_is_small_and_valid():
    cases = suite("quick", "cpu")
    assert 10 <= len(cases) <= 24
    assert {"memattn", "naive", "sdpa"} <= {c.impl for c in cases}
    assert max(c.n for c in cases if c.nq is None) <= 2048


def test_anchor_suite_covers_anchors_md():
    cases = suite("anchors", "cuda")
    found = {(c.impl, c.d, c.n, c.causal, c.pattern) for c in cases if anchor_for(c) is not None}
    # every dense TFLOP/s anchor of anchors.md has a case
    dense = {(k[0], k[1], k[2], k[3], None) for k, a in ANCHORS.items() if a.unit == "TFLOP/s"}
    assert dense <= found
    assert ("flex", 128, 131072, True, "sliding_window:1024") in found
    assert ("sdpa-cudnn", 128, 65536, False, None) in found  # decoding
    assert all(c.device == "cuda" and c.dtype == "bfloat16" for c in cases)
    # memattn sits beside the peers in every dense group
    assert {c.n for c in cases if c.impl == "memattn" and c.group == "anchors D=128"} == {1024, 4096, 16384}
    assert len(cases) <= 80  # keeps the H200 run within minutes
    a = anchor_for(Case("sdpa-cudnn", 4096, d=128, heads=16, batch=4, dtype="bfloat16", device="cuda"))
    assert (a.fwd, a.fwdbwd, a.unit) == (594, 531, "TFLOP/s")


def test_unknown_suite():
    with pytest.raises(ValueError, match="suite"):
        suite("nope", "cpu")


def test_import_memattn_stays_light():
    import subprocess
    import sys

    code = "import sys, memattn; print(sorted(m for m in ('matplotlib', 'psutil') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_mechanism_case():
    c = bud.mechanism_case("window", 2048, window=128, heads=2)
    assert c.impl == "memattn" and c.pattern == "sliding_window:128" and c.group == "window"
    with pytest.raises(ValueError, match="mechanism"):
        bud.mechanism_case("nope", 16)
    assert math.isfinite(predict(c)["train_peak"])


FLEX_MODS = (
    ("causal", dict(causal=True)),
    ("causal_nq_lt_nk", dict(causal=True, nq=40)),
    ("window_causal", dict(causal=True, pattern="sliding_window:9")),
    ("window_two_sided", dict(causal=False, pattern="sliding_window:5,3")),
)


@pytest.mark.parametrize("name,kw", FLEX_MODS, ids=[f[0] for f in FLEX_MODS])
def test_flex_mask_mods_match_the_dense_mask(name, kw):
    c = Case("flex", 100, d=8, heads=1, **kw)
    mod = peers._flex_mask_mod(c)
    qi = torch.arange(c.q_len)[:, None]
    ki = torch.arange(c.n)[None, :]
    got = mod(torch.tensor(0), torch.tensor(0), qi, ki)
    assert torch.equal(got, peers._dense_allowed(c, torch.device("cpu")))
    assert peers._flex_mask_mod(Case("flex", 100)) is None


def test_peer_ratios_compare_same_shape_only():
    from memattn.bench.report import format_peer_ratios
    from memattn.bench.runner import base_row

    def row(impl, n, ms, mib):
        r = base_row(Case(impl, n, causal=True, group="g"))
        r.update(status="ok", fwd_ms=ms, fwdbwd_ms=3 * ms, fwdbwd_peak_mib=mib)
        return r
    text = format_peer_ratios([row("memattn", 1024, 2.0, 10.0), row("sdpa", 1024, 4.0, 20.0),
                               row("naive", 2048, 1.0, 1.0)])
    assert "vs SDPA: fwd ×2.00, f+b ×2.00, f+b memory ×0.50" in text
    assert "naive" not in text


SEARCH = (("linear", 1.0, 3000.0), ("quadratic", 2.0, 0.002), ("constant_plus_linear", 1.0, 900.0))


@pytest.mark.parametrize("name,power,coef", SEARCH, ids=[s[0] for s in SEARCH])
def test_find_max_n_search_logic(monkeypatch, name, power, coef):
    budget = 2**30
    base = 50 * 2**20 if name.startswith("constant") else 0

    def fake_worker(mode, cases, opts, on_event, extra=None):
        n = cases[0].n
        on_event({"event": "row", "index": 0, "row": {"status": "ok", "peak": base + coef * n**power}})
        return 0
    monkeypatch.setattr(bud, "run_worker", fake_worker)
    res = bud.find_max_n(lambda n: Case("naive", n), budget, start=256, tolerance=0.01, multiple=128)
    true_max = ((budget - base) / coef) ** (1 / power)
    assert res["max_n"] <= true_max < res["first_miss"]
    assert res["first_miss"] - res["max_n"] <= 128 or (res["first_miss"] - res["max_n"]) / res["max_n"] <= 0.01
    doubling = int(math.log2(true_max / 256)) + 2
    assert len(res["probes"]) <= doubling + 5  # the peak-guided steps converge in a few probes


def test_find_max_n_start_too_big(monkeypatch):
    def fake_worker(mode, cases, opts, on_event, extra=None):
        on_event({"event": "row", "index": 0, "row": {"status": "ok", "peak": 2**40}})
        return 0
    monkeypatch.setattr(bud, "run_worker", fake_worker)
    res = bud.find_max_n(lambda n: Case("naive", n), 2**20, start=1024)
    assert res["max_n"] is None and res["first_miss"] == 1024 and len(res["probes"]) == 1
    with pytest.raises(ValueError, match="budget"):
        bud.find_max_n(lambda n: Case("naive", n), 0)


def test_worker_over_budget_before_first_case_is_an_oom_row(monkeypatch):
    from memattn.bench import runner
    from memattn.bench.memory import BUDGET_EXIT

    calls = []

    def fake(mode, cases, opts, on_event, extra=None):
        calls.append(len(cases))
        return BUDGET_EXIT  # killed by its watchdog before emitting anything
    monkeypatch.setattr(runner, "run_worker", fake)
    cases = [Case("naive", 256, d=8, heads=1), Case("sdpa", 256, d=8, heads=1)]
    rows = runner.run_cases(cases, RunOptions(budget=1))
    assert [r["status"] for r in rows] == ["oom", "oom"] and calls == [2, 1]


def test_time_planner_predicts_from_the_line():
    from memattn.bench.runner import TimePlanner

    p = TimePlanner(line_seconds=10.0)
    c1, c2, c3 = (Case("naive", n) for n in (1024, 2048, 8192))
    assert p.reason_to_skip(c1) is None  # nothing known yet: run
    p.record(c1, 1.0, {"status": "ok", "fwd_ms": 200.0, "fwdbwd_ms": 300.0})
    assert p.reason_to_skip(c2) is None  # 1 s spent + 1.1·0.5·4 + 0.5 = 3.7 s
    p.record(c2, 2.5, {"status": "ok", "fwd_ms": 800.0, "fwdbwd_ms": 1200.0})
    why = p.reason_to_skip(c3)  # slope 2 from the two sizes: 1.1·2·16 + 0.5 = 35.7 s
    assert why is not None and "N^2.0" in why and "36 s" in why
    w = Case("memattn", 8192, pattern="sliding_window:64")
    p.record(Case("memattn", 1024, pattern="sliding_window:64"), 0.1, {"status": "ok", "fwd_ms": 10.0, "fwdbwd_ms": 10.0})
    assert p.reason_to_skip(w) is None  # a window line scales as N: 1.1·0.02·8 + 0.5 s
