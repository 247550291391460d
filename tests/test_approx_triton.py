"""Triton causal linear-attention kernels under TRITON_INTERPRET=1 (tiny shapes, float32),
against the float64 formula: outputs and the gradients of features and values."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported (decided when kernels are decorated)

import pytest  # noqa: E402
import torch  # noqa: E402

from memattn.approx import FavorPositive, favor_projection, linear_attention  # noqa: E402
from memattn.approx import triton_linear  # noqa: E402
from memattn.approx.triton_linear import (LinearTiles, causal_linear_features, tiles_for,  # noqa: E402
                                          triton_causal_linear_attention)

TOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def naive(pq, pk, v, eps=1e-6):
    pq, pk, v = pq.double(), pk.double(), v.double()
    w = torch.tril(pq @ pk.transpose(-1, -2))
    return (w @ v) / (w.sum(-1, keepdim=True) + eps)


# (id, B, H, N, F, Dv, chunk)
CASES = (
    ("n_multiple", 1, 2, 32, 16, 16, 16),
    ("ragged", 2, 1, 37, 8, 5, 16),
    ("f_gt_block", 1, 1, 50, 80, 20, 32),
    ("dv_gt_block", 1, 1, 20, 16, 70, 16),
    ("three_rows", 1, 1, 3, 16, 16, 16),
    ("dv_gt_prep_block", 1, 2, 20, 16, 150, 16),     # the backward's preparation loops over Dv
)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_float64_formula(case):
    _, B, H, N, F, Dv, bt = case
    gen = torch.Generator().manual_seed(0)
    pq = torch.rand(B, H, N, F, generator=gen).requires_grad_()
    pk = torch.rand(B, H, N, F, generator=gen).requires_grad_()
    v = torch.randn(B, H, N, Dv, generator=gen).requires_grad_()
    out = causal_linear_features(pq, pk, v, chunk_size=bt)
    ref = naive(pq, pk, v)
    assert rel_err(out, ref) <= TOL
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (pq, pk, v), g.float())
    want = torch.autograd.grad(ref, (pq, pk, v), g)
    for name, a, b in zip(("pq", "pk", "v"), got, want):
        assert rel_err(a, b) <= TOL, name


def test_strided_inputs_and_outputs():
    x = torch.rand(1, 40, 2, 16, 3)                                # (B, N, H, F, 3)
    pq, pk, v = (x[..., i].transpose(1, 2).requires_grad_() for i in range(3))
    assert not pq.is_contiguous()
    out = causal_linear_features(pq, pk, v, chunk_size=16)
    ref = naive(pq, pk, v)
    assert rel_err(out, ref) <= TOL
    g = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (pq, pk, v), g.float()), torch.autograd.grad(ref, (pq, pk, v), g)):
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("fmap", ("elu", "favor"))
def test_full_path_with_feature_map_gqa_and_padding_equals_pytorch_path(fmap):
    gen = torch.Generator().manual_seed(1)
    if fmap == "favor":   # per-row eps (FAVOR+ shifts) goes through the ROW_EPS path
        fmap = FavorPositive(favor_projection(16, 32, generator=torch.Generator().manual_seed(2)))
    q = torch.randn(2, 4, 24, 16, generator=gen).requires_grad_()
    k = torch.randn(2, 2, 24, 16, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 24, 16, generator=gen).requires_grad_()
    km = torch.ones(2, 24, dtype=torch.bool)
    km[1, 18:] = False
    a = triton_causal_linear_attention(q, k, v, feature_map=fmap, key_padding_mask=km, chunk_size=16)
    b = linear_attention(q, k, v, feature_map=fmap, causal=True, key_padding_mask=km, backend="pytorch")
    assert rel_err(a, b) <= TOL
    g = torch.randn(a.shape, generator=gen)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g)):
        assert rel_err(x, y) <= TOL


@pytest.mark.parametrize(
    "shapes, kwargs, exc, match",
    (
        (((1, 1, 8, 4), (1, 1, 8, 5), (1, 1, 8, 4)), {}, ValueError, "pq, pk"),
        (((1, 1, 8, 4), (1, 1, 8, 4), (1, 1, 8, 4)), dict(chunk_size=24), ValueError, "power of two"),
        (((1, 1, 8, 4), (1, 1, 8, 4), (1, 1, 8, 4)), dict(chunk_size=8), ValueError, "power of two"),
    ),
    ids=("feature_mismatch", "chunk_not_pow2", "chunk_lt_16"),
)
def test_launcher_validation(shapes, kwargs, exc, match):
    pq, pk, v = (torch.rand(s) for s in shapes)
    with pytest.raises(exc, match=match):
        causal_linear_features(pq, pk, v, **kwargs)


def test_launcher_rejects_float64():
    x = torch.rand(1, 1, 8, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        causal_linear_features(x, x, x)


# Every launch shape the chooser (or a benchmark's override) can take: state tiles of 16
# and 32 (several programs per feature / value width), per-chunk tiles that cover the whole
# width (128) or split it, pipelining on and off, 8 warps, the backward's two state sweeps
# fused into one launch or not. Non-contiguous grad_out exercises
# the strided loads of the backward's preparation kernel.
TILES = (
    LinearTiles(state_block=16, chunk_block=16, num_warps=4, chunk_stages=1, state_stages=1, fused_sweeps=True),
    LinearTiles(state_block=32, chunk_block=128, num_warps=8, chunk_stages=None, state_stages=None),
    LinearTiles(state_block=64, chunk_block=32, num_warps=4, chunk_stages=2, state_stages=3, fused_sweeps=True),
)


@pytest.mark.parametrize("tiles", TILES, ids=("s16c16fused", "s32c128w8", "s64c32st_fused"))
def test_every_launch_shape_matches_float64_formula(tiles, monkeypatch):
    monkeypatch.setattr(triton_linear, "_OVERRIDE", [tiles])
    gen = torch.Generator().manual_seed(4)
    B, H, N, F, Dv = 2, 2, 45, 40, 72
    pq = torch.rand(B, H, N, F, generator=gen).requires_grad_()
    pk = torch.rand(B, H, N, F, generator=gen).requires_grad_()
    v = torch.randn(B, H, N, Dv, generator=gen).requires_grad_()
    out = causal_linear_features(pq, pk, v, chunk_size=16)
    ref = naive(pq, pk, v)
    assert rel_err(out, ref) <= TOL
    g = torch.randn(B, H, Dv, N, generator=gen, dtype=torch.float64).transpose(-1, -2)
    got = torch.autograd.grad(out, (pq, pk, v), g.float())
    want = torch.autograd.grad(ref, (pq, pk, v), g)
    for name, a, b in zip(("pq", "pk", "v"), got, want):
        assert rel_err(a, b) <= TOL, name


def test_tiles_for_default_and_override(monkeypatch):
    monkeypatch.setattr(triton_linear, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    # the shapes measured fastest on the H200 (session 5): 64-wide state tiles, pipelined
    # per-chunk kernels; the two backward sweeps fused when 64-wide tiles give fewer
    # programs than multiprocessors (B·H = 16 with F = Dv = 128: 64 programs)
    for bh, fused in ((16, True), (64, False)):
        t = tiles_for(bh, 128, 128, cpu)
        assert (t.state_block, t.chunk_stages, t.fused_sweeps) == (64, None, fused)
    over = LinearTiles(state_block=16)
    monkeypatch.setattr(triton_linear, "_OVERRIDE", [over])
    assert tiles_for(64, 128, 128, cpu) is over


def _same_roundings(pq, pk, v, bt):
    """The same-roundings reference of scripts/gpu_linear.py (float32 chunked algorithm with the
    carried state and the in-chunk scores rounded to the inputs' dtype before their products,
    the output rounded), on the (B, H, N, ·) layout."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_linear.py"
    spec = importlib.util.spec_from_file_location("gpu_linear", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.reference_features(*(t.detach().transpose(1, 2) for t in (pq, pk, v)), chunk=bt, round_to=pq.dtype)
    return out.transpose(1, 2)


def test_float16_equals_the_same_roundings_within_one_ulp():
    """16-bit inputs: states are stored in the inputs' dtype (each product rounds them to it
    anyway). The output equals the chunked algorithm with the same roundings (to one float16
    ulp of the largest output at worst, 1e-5 on average), and the gradients match the float64
    formula to 4 ulps."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, F, Dv, bt = 2, 2, 150, 40, 24, 32
    pq = torch.rand(B, H, N, F, generator=gen).half().requires_grad_()
    pk = torch.rand(B, H, N, F, generator=gen).half().requires_grad_()
    v = torch.randn(B, H, N, Dv, generator=gen).half().requires_grad_()
    out = causal_linear_features(pq, pk, v, chunk_size=bt)
    assert out.dtype == torch.float16
    ulp = 2.0 ** -11
    ref = _same_roundings(pq, pk, v, bt).double()
    assert rel_err(out, ref) <= ulp
    # on average far closer than one ulp (a few final-rounding flips at most); the exact
    # float64 result differs from the same-roundings one by ~2e-4 here, so this separates them
    assert ((out.double() - ref).abs().mean() / ref.abs().mean()).item() <= 1e-5
    g = torch.randn(out.shape, generator=gen).half()
    got = torch.autograd.grad(out, (pq, pk, v), g)
    exact = [t.detach().double().requires_grad_() for t in (pq, pk, v)]
    want = torch.autograd.grad(naive(*exact), exact, g.double())
    for name, a, b in zip(("pq", "pk", "v"), got, want):
        assert rel_err(a, b) <= 4 * ulp, name


def test_fused_sweeps_are_bit_identical_to_two_launches(monkeypatch):
    """One launch for the backward's two state sweeps runs the same arithmetic per program."""
    gen = torch.Generator().manual_seed(5)
    pq, pk = (torch.rand(2, 3, 70, 24, generator=gen).half().requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, 70, 40, generator=gen).half().requires_grad_()
    g = torch.randn(2, 3, 70, 40, generator=gen).half()
    grads = []
    for fused in (False, True):
        monkeypatch.setattr(triton_linear, "_OVERRIDE", [LinearTiles(state_block=16, fused_sweeps=fused)])
        out = causal_linear_features(pq, pk, v, chunk_size=16)
        grads.append(torch.autograd.grad(out, (pq, pk, v), g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
