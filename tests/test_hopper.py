"""The Gluon Hopper forward (memattn/backends/triton/hopper.py).

CI has no GPU and Gluon has no interpreter, so the kernel's logic is covered three ways here:
the launcher's routing rules (which calls take the Gluon path) on CPU tensors; an ahead-of-time
build of every kernel variant for sm_90 with Triton's bundled ptxas (no spills); and, on an
sm_90 GPU only, the FlashAttention rule against the reference for every mask family the path
takes (the H200 runs of scripts/gpu_triton.py cover the full grid).
"""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

from memattn.backends.triton import hopper, launch  # noqa: E402
from memattn.backends.triton.configs import TileConfig  # noqa: E402

from _sm90 import needs_ptxas, run_compile_script  # noqa: E402  (tests/ is on sys.path)

needs_gluon = pytest.mark.skipif(not hopper.HAVE_GLUON, reason="this Triton has no Gluon")


def _qkv(nq=256, nk=256, d=128, dtype=torch.bfloat16, hkv=2):
    q = torch.zeros(1, 4, nq, d, dtype=dtype)
    k = torch.zeros(1, hkv, nk, d, dtype=dtype)
    return q, k, k.clone()


@pytest.fixture
def sm90(monkeypatch):
    """Pretend the tensors' device is an sm_90 GPU, so usable() judges the other rules."""
    monkeypatch.setattr(hopper, "_capability_ok", lambda device: True)
    monkeypatch.setattr(hopper, "_ENABLED", [True])


@needs_gluon
def test_usable_takes_the_covered_calls(sm90):
    q, k, v = _qkv()
    assert hopper.usable(q, k, v, False, 0.0, 0.0, True)
    assert hopper.usable(*_qkv(dtype=torch.float16), False, 0.0, 0.0, True)


@needs_gluon
@pytest.mark.parametrize("what", ["float32", "d96", "d64", "dv64", "map", "softcap", "dropout", "no_tma", "short",
                                  "off"])
def test_usable_sends_the_rest_to_triton(sm90, what):
    d = {"d96": 96, "d64": 64}.get(what, 128)        # D = 64 compiles but measured slower: Triton
    q, k, v = _qkv(dtype=torch.float32 if what == "float32" else torch.bfloat16, d=d,
                   nq=64 if what == "short" else 256)
    if what == "dv64":
        v = v[..., :64]
    if what == "off":
        hopper.set_enabled(False)
    assert not hopper.usable(q, k, v, what == "map", 1.0 if what == "softcap" else 0.0,
                             0.1 if what == "dropout" else 0.0, what != "no_tma")


def test_usable_needs_sm90():
    q, k, v = _qkv()
    assert not hopper.usable(q, k, v, False, 0.0, 0.0, True)          # CPU tensors
    assert not hopper._capability_ok(torch.device("cpu"))


@needs_gluon
def test_launcher_routes_by_override_and_hook(monkeypatch):
    q, k, v = _qkv()
    assert not launch._gluon_wanted(q, k, v, launch.MaskArgs(), 0.0, 0.0)   # CPU tensors: never
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    m = launch.MaskArgs(window=torch.tensor([[512, 0]], dtype=torch.int32), tag="causal")
    monkeypatch.setattr(hopper, "usable", lambda *a: True)
    assert launch._gluon_wanted(q, k, v, m, 0.0, 0.0)
    with launch.override_configs(fwd=TileConfig(128, 64, 8, 3)):      # a forced Triton config
        assert not launch._gluon_wanted(q, k, v, m, 0.0, 0.0)
    with launch.override_configs(fwd=hopper.CONFIG[128]):             # the Gluon marker
        assert launch._gluon_wanted(q, k, v, m, 0.0, 0.0)
    launch.set_launch_hook(lambda kernel, grid, kw: None)
    try:
        assert not launch._gluon_wanted(q, k, v, m, 0.0, 0.0)         # hooks see Triton launches only
    finally:
        launch.set_launch_hook(None)


@needs_gluon
def test_gluon_dq_is_default_and_checks_its_row_stride(monkeypatch):
    from memattn.backends.triton import hopper_dq

    monkeypatch.delenv("MEMATTN_GLUON_DQ", raising=False)
    assert hopper_dq.enabled()                           # on by default since session 15
    monkeypatch.setenv("MEMATTN_GLUON_DQ", "0")
    assert not hopper_dq.enabled()
    monkeypatch.setenv("MEMATTN_GLUON_DQ", "1")
    assert hopper_dq.enabled()
    q, k, _ = _qkv(nq=300, nk=300)
    win = torch.tensor([[600, 0]], dtype=torch.int32)
    plan = hopper_dq.dq_plan(q, k, win, None, None, 0, 0.1, 384)
    assert plan.grid == (3, 4) and plan.gluon and plan.cfg == hopper_dq.DQ_CONFIG[128]
    with pytest.raises(ValueError, match="lse_rs"):
        hopper_dq.dq_plan(q, k, win, None, None, 0, 0.1, 512)


@needs_gluon
def test_backward_passes_route_by_override_and_switch(monkeypatch):
    q, k, v = _qkv()
    m = launch.MaskArgs(window=torch.tensor([[512, 0]], dtype=torch.int32), tag="causal")
    assert not launch._gluon_pass_wanted("dkdv", q, k, v, (q,), m, 0.0, 0.0)     # CPU tensors: never
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(hopper, "usable", lambda *a: True)
    monkeypatch.delenv("MEMATTN_GLUON_DQ", raising=False)
    assert launch._gluon_pass_wanted("dkdv", q, k, v, (q,), m, 0.0, 0.0)
    assert launch._gluon_pass_wanted("dq", q, k, v, (q, q), m, 0.0, 0.0)       # the default
    monkeypatch.setenv("MEMATTN_GLUON_DQ", "0")
    assert not launch._gluon_pass_wanted("dq", q, k, v, (q, q), m, 0.0, 0.0)
    monkeypatch.setenv("MEMATTN_GLUON_DQ", "1")
    with launch.override_configs(dq=TileConfig(128, 64, 8, 3)):
        assert not launch._gluon_pass_wanted("dq", q, k, v, (q, q), m, 0.0, 0.0)
    with launch.override_configs(dkdv=TileConfig(64, 128, 8, 3)):
        assert not launch._gluon_pass_wanted("dkdv", q, k, v, (q,), m, 0.0, 0.0)
    # per-head windows with a GQA group: the dK/dV kernel walks a group with one window
    per_head = launch.MaskArgs(window=torch.tensor([[512, 0]] * 4, dtype=torch.int32), tag="window")
    assert not launch._gluon_pass_wanted("dkdv", q, k, v, (q,), per_head, 0.0, 0.0)


def test_set_enabled_round_trip():
    old = hopper._ENABLED[0]
    try:
        hopper.set_enabled(False)
        assert hopper._ENABLED == [False]
        hopper.set_enabled(True)
        assert hopper._ENABLED == [True]
    finally:
        hopper._ENABLED[0] = old


AOT = textwrap.dedent('''
    import sys, torch
    from memattn.backends.triton.aot import ptxas_info, use_sm90_target

    use_sm90_target()
    from memattn.backends.triton import hopper as hp, hopper_dq as hq
    bad = []

    def report(label, ck, spill_cap):
        info = ptxas_info(ck.asm["ptx"])
        n_mma = ck.asm["ptx"].count("wgmma.mma_async")
        print(f"{label} smem={ck.metadata.shared} spill={info['spill']} serialised={info['serialised']} "
              f"wgmma={n_mma}")
        if (not info["ok"] or info["serialised"] or (info["spill"] or 0) > spill_cap or not n_mma
                or ck.metadata.shared > 232448):
            bad.append((label, info["stderr"][-300:]))

    win = torch.zeros(1, 2, dtype=torch.int32)
    for D in (64, 128):                 # D = 64 is not routed (slower, session 14) but must build
        for dt in (torch.bfloat16, torch.float16):
            for docs in (False, True):
                # a B, N, H, D memory layout seen as B, H, N, D: the 4-D descriptors' strides
                q = torch.empty(1, 256, 4, D, dtype=dt).transpose(1, 2)
                k = torch.empty(1, 300, 2, D, dtype=dt).transpose(1, 2)
                out, lse = torch.empty_like(q), torch.empty(1, 4, 256)
                ids = torch.zeros(300, dtype=torch.int32) if docs else win
                rng = torch.zeros(3, 2, dtype=torch.int32) if docs else win
                ck = hp._attn_fwd_hopper.warmup(
                    hp._desc(q, 64), hp._desc(k, 128), hp._desc(k, 128), hp._desc(out, 64), lse, win, ids, rng,
                    256, 300, 4, 2, 0, 0, 0.1, HAS_DOCS=docs, REVERSE=not docs, STAGES=hp._STAGES[D],
                    CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4, grid=(2, 4))
                report(f"fwd D={D} {dt} docs={docs}", ck, 0)
                if dt is torch.float16:
                    continue
                rows = torch.empty(4, 384)

                def dkdv(accum):
                    return hp._attn_bwd_dkdv_hopper.warmup(
                        hp._desc(q, 64), hp._desc(k, 64), hp._desc(k, 64), hp._desc(q, 64), hp._desc(k, 64),
                        hp._desc(k, 64), rows, rows, win, ids, rng, 256, 300, 4, 2, 2, 0, 0, 384, 0.1, 0.1,
                        HAS_DOCS=docs, STAGES=hp._BWD_STAGES[D], PAIRS=hp.BWD_PAIRS, ACCUM=accum,
                        CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4, grid=(3, 2))

                def dq(accum):
                    return hq._attn_bwd_dq_hopper.warmup(
                        hp._desc(q, 64), hp._desc(q, 64), hp._desc(q, 64), hp._desc(k, 64), hp._desc(k, 64),
                        hp._desc(q, 64), lse, rows[:, :256], rows[:, :256], win, ids, rng, 256, 300, 4, 2, 0, 0,
                        256, 0.1, 0.1, HAS_DOCS=docs, STAGES=hq._DQ_STAGES[D], PAIRS=hq.DQ_PAIRS, ACCUM=accum,
                        CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4, grid=(2, 4))

                # at D = 128 a few loop-invariant scalars spill (108 / 140 bytes; the SASS of the
                # main loop shows 7 / 10 4-byte reloads per query tile and no stores, session 14)
                report(f"dkdv D={D} docs={docs}", dkdv(False), 160)
                if D != 128:
                    continue
                report(f"dq D={D} docs={docs}", dq(False), 0)
                # accumulate_into (the ring): the epilogues add what the gradients hold
                report(f"dkdv+acc D={D} docs={docs}", dkdv(True), 200)
                report(f"dq+acc D={D} docs={docs}", dq(True), 0)
    print("bad:", bad)
    sys.exit(1 if bad else 0)
''')


@needs_gluon
@needs_ptxas
def test_gluon_kernels_compile_for_sm90():
    p = run_compile_script(AOT)
    assert (p.stdout.count("fwd D=") == 8 and p.stdout.count("dkdv D=") == 4 and p.stdout.count("dq D=") == 2
            and p.stdout.count("dkdv+acc D=") == 2 and p.stdout.count("dq+acc D=") == 2), p.stdout


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@needs_gluon
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (the H200 runs cover it)")
@pytest.mark.parametrize("family", ["full", "causal", "window", "window_lr", "docs_causal", "nq_gt_nk", "bnhd",
                                    "per_head_mha"])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 128)])
@pytest.mark.parametrize("gluon_dq", [False, True])
def test_gluon_kernels_match_reference_on_gpu(family, dtype, d, gluon_dq, monkeypatch):
    """Output, lse and all three gradients: the Gluon forward and dK/dV kernels, with the
    Gluon dQ pass (the default, hopper_dq.py) or the Triton one (MEMATTN_GLUON_DQ=0)."""
    monkeypatch.setenv("MEMATTN_GLUON_DQ", "1" if gluon_dq else "0")
    import memattn
    from memattn import patterns as P
    from _errors import check_close, lse_floor

    nq, nk = (1000, 700) if family == "nq_gt_nk" else (1023, 1023)
    hkv = 4 if family == "per_head_mha" else 2
    pat = {"full": None, "causal": P.causal(), "window": P.sliding_window(200),
           "window_lr": P.sliding_window(130, 70), "docs_causal": P.document([300, 500, 223]) & P.causal(),
           "nq_gt_nk": P.causal(), "bnhd": P.causal(),
           "per_head_mha": P.sliding_window((16, 64, 256, 700), (0, 8, 0, 50))}[family]
    g = torch.Generator().manual_seed(3)
    if family == "bnhd":
        q = torch.randn(2, nq, 4, d, generator=g).to("cuda", dtype).transpose(1, 2)
        k, v = (torch.randn(2, nk, hkv, d, generator=g).to("cuda", dtype).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(2, 4, nq, d, generator=g).to("cuda", dtype)
        k, v = (torch.randn(2, hkv, nk, d, generator=g).to("cuda", dtype) for _ in range(2))
    do = torch.randn(2, 4, nq, d, generator=g).to("cuda", dtype)
    res = []
    # a first call on other values builds the cached plans; the checked call then takes their
    # direct launchers (descriptors encoded by plans._expanded, not by Triton's wrapper)
    first = [torch.randn_like(x).requires_grad_(True) for x in (q, k, v)]
    o1 = memattn.attention(*first, pattern=pat, backend="triton")
    torch.autograd.grad(o1, first, torch.randn_like(do))
    for backend, dt in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
        qq, kk, vv = (x.detach().to(dt).requires_grad_(True) for x in (q, k, v))
        before = launch.launch_counts()["gluon"]
        out, lse = memattn.attention(qq, kk, vv, pattern=pat, backend=backend, return_lse=True)
        grads = torch.autograd.grad(out, (qq, kk, vv), do.to(dt))
        if backend == "triton":          # the forward, the dK/dV pass (and the dQ pass) took Gluon
            assert launch.launch_counts()["gluon"] == before + 2 + gluon_dq
        res.append((out, lse, *grads))
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        extra = {"min_atol": lse_floor(res[2][i])} if name == "lse" else {}
        check_close(res[0][i], res[1][i], res[2][i], mult=2.0 if i < 2 else 3.0, name=name, **extra)


@needs_gluon
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU (the H200 runs cover it)")
@pytest.mark.parametrize("family", ["causal", "window", "docs_causal", "gqa_full"])
def test_gluon_backward_accumulates_into_views_on_gpu(family):
    """accumulate_into (the ring's form) through the Gluon dK/dV and dQ passes: the gradients
    land on row views of larger buffers, added to what they held (each kernel's epilogue reads
    the old tile by TMA); rows outside the views stay untouched."""
    import memattn
    from memattn import patterns as P
    from memattn.api import attention_backward

    n, hkv = 1000, (1 if family == "gqa_full" else 4)
    pat = {"causal": P.causal(), "window": P.sliding_window(200), "gqa_full": None,
           "docs_causal": P.document([300, 500, 200]) & P.causal()}[family]
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, n, 128, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2, hkv, n, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    out, lse = memattn.attention(q, k, v, pattern=pat, backend="triton", return_lse=True)
    fresh = attention_backward(q, k, v, out, do, lse, pattern=pat, backend="triton")
    bufs = [torch.randn(t.shape[0], t.shape[1], n + 256, 128, generator=g).to("cuda", torch.bfloat16)
            for t in (q, k, v)]
    before = [b.clone() for b in bufs]
    # a first call on other buffers of the same layout builds the plans; the checked call then
    # takes the direct launchers with its own addresses
    attention_backward(q, k, v, out, do, lse, pattern=pat, backend="triton",
                       accumulate_into=tuple(torch.zeros_like(b)[:, :, 128:128 + n] for b in bufs))
    c0 = launch.launch_counts()["gluon"]
    attention_backward(q, k, v, out, do, lse, pattern=pat, backend="triton",
                       accumulate_into=tuple(b[:, :, 128:128 + n] for b in bufs))
    assert launch.launch_counts()["gluon"] == c0 + 2          # dQ and dK/dV both took Gluon
    for name, b, b0, f in zip(("dq", "dk", "dv"), bufs, before, fresh):
        want = b0[:, :, 128:128 + n].float() + f.float()
        got = b[:, :, 128:128 + n].float()
        # two bf16 roundings apart at most (the sum's, and the fresh gradient's)
        tol = 2.0 ** -7 * (want.abs() + f.float().abs()) + 1e-6
        assert ((got - want).abs() <= tol).all(), (name, float((got - want).abs().max()))
        assert torch.equal(b[:, :, :128], b0[:, :, :128]) and torch.equal(b[:, :, 128 + n:], b0[:, :, 128 + n:]), name


def _load_script(name: str):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gluon_scripts_load_and_variants_set_the_kernels_values(monkeypatch):
    """scripts/gpu_gluon.py and gpu_gluon_variants.py (H200 only to run): they load without a GPU,
    and a variant sets the values the backward plans read, expiring the cached plans."""
    from memattn.backends.triton import hopper_dq

    assert callable(_load_script("gpu_gluon").main)
    var = _load_script("gpu_gluon_variants")
    assert var.VARIANTS["base"] == (hopper.BWD_PAIRS, hopper_dq.DQ_PAIRS, hopper._BWD_STAGES[128],
                                    hopper_dq._DQ_STAGES[128])              # the base is the default
    monkeypatch.setattr(hopper, "BWD_PAIRS", hopper.BWD_PAIRS)        # restored after the test
    monkeypatch.setattr(hopper_dq, "DQ_PAIRS", hopper_dq.DQ_PAIRS)
    monkeypatch.setitem(hopper._BWD_STAGES, 128, hopper._BWD_STAGES[128])
    monkeypatch.setitem(hopper_dq._DQ_STAGES, 128, hopper_dq._DQ_STAGES[128])
    v0 = launch._VERSION[0]
    var._set("pairs_kv2")
    assert (hopper.BWD_PAIRS, hopper_dq.DQ_PAIRS, hopper._BWD_STAGES[128]) == (True, True, 2)
    assert launch._VERSION[0] == v0 + 1
