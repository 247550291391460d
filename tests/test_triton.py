"""Triton backend under the CPU interpreter: outputs, lse and all gradients by the
FlashAttention rule (design.md §4), every path of the kernels (parametric window / document
ranges, block map + bit tiles, sub-tiles of map blocks), dropout bit-exactness, fully masked
rows, determinism, poisoning, the custom ops and torch.compile tracing.

The GPU grid (all head dims, long sequences, bfloat16) runs in scripts/gpu_triton.py.
"""

from __future__ import annotations

import os

# The interpreter must be on before any kernel module is imported (triton decides at
# decoration time whether a @triton.jit function is compiled or interpreted).
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the triton package is not installed")

import memattn  # noqa: E402
from memattn import patterns  # noqa: E402
from memattn._dropout import keep_mask  # noqa: E402
from memattn.backends import reference  # noqa: E402
from memattn.backends import triton as tb  # noqa: E402
from memattn.backends.triton import launch, masks, plans  # noqa: E402

from _errors import check_close  # noqa: E402  (tests/ is on sys.path)

T = launch.TileConfig


# ----------------------------------------------------------------------------- the rule
def assert_fa_rule(name: str, got: torch.Tensor, same: torch.Tensor, oracle: torch.Tensor, factor: float) -> None:
    """The FlashAttention rule of design.md §4 (tests/_errors.py)."""
    check_close(got, same, oracle, mult=factor, name=name)


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    pattern: Callable[[], patterns.Pattern | None] = lambda: None
    B: int = 1
    H: int = 2
    Hkv: int = 2
    Nq: int = 48
    Nk: int = 48
    D: int = 32
    Dv: int | None = None
    dtype: torch.dtype = torch.float32
    softcap: float = 0.0
    layout: str = "bhnd"           # "bnhd": (B, N, H, D) memory viewed as (B, H, N, D)
    force_map: bool = False
    map_blocks: tuple = ((32, 32),)
    configs: dict = field(default_factory=dict)


def _make(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def t(h: int, n: int, d: int) -> torch.Tensor:
        x = torch.randn(c.B, n, h, d, generator=g) if c.layout == "bnhd" else torch.randn(c.B, h, n, d, generator=g)
        x = x.to(c.dtype)
        return x.transpose(1, 2) if c.layout == "bnhd" else x

    q, k, v = t(c.H, c.Nq, c.D), t(c.Hkv, c.Nk, c.D), t(c.Hkv, c.Nk, c.Dv or c.D)
    do = torch.randn(c.B, c.H, c.Nq, c.Dv or c.D, generator=g).to(c.dtype)
    return q, k, v, do


def _run_triton(c: Case, q, k, v, do, pattern, scale):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    spec = masks.describe(pattern, c.Nq, c.Nk, c.H, "cpu", batch=c.B, force_map=c.force_map,
                          map_blocks=c.map_blocks)
    from memattn.backends.triton.function import attention as attn, mask_args

    with launch.override_configs(**c.configs):
        out, lse = attn(q, k, v, mask_args(spec), scale=scale, softcap=c.softcap)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return spec, out.detach(), lse.detach(), dq, dk, dv


def _run_reference(q, k, v, do, pattern, scale, softcap, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
    out, lse = reference.attention(q, k, v, pattern=pattern, scale=scale, softcap=softcap)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    return out.detach(), lse, dq, dk, dv


def check_case(c: Case, seed: int = 0):
    q, k, v, do = _make(c, seed)
    pattern = c.pattern()
    scale = c.D ** -0.5
    spec, *got = _run_triton(c, q, k, v, do, pattern, scale)
    ref_p = pattern.for_sizes(c.Nq, c.Nk) if pattern is not None else None
    same = _run_reference(q, k, v, do, ref_p, scale, c.softcap, c.dtype)
    oracle = _run_reference(q, k, v, do, ref_p, scale, c.softcap, torch.float64)
    for name, g_, s_, o_, f in zip(("out", "lse", "dq", "dk", "dv"), got, same, oracle, (2, 2, 3, 3, 3)):
        assert g_.dtype == (torch.float32 if name == "lse" else c.dtype), name
        assert_fa_rule(name, g_, s_, o_, f)
    return spec, got


def _window_heads():
    return patterns.sliding_window((3, 9, 0, 40), (0, 4, 2, 1))


def _mask_mod_prefix(b, h, q, k):
    return (k <= q) | (k < 5)


def _mask_mod_gaps(b, h, q, k):
    # rows with q % 7 == 3 attend to nothing; the rest see keys of equal parity
    return ((q - k) % 2 == 0) & (q % 7 != 3)


_F16 = torch.float16
CASES: dict[str, Case] = {
    # ---- dense, shapes, dtypes, layouts
    "dense-f32": Case(B=2),
    "dense-f16": Case(dtype=_F16),
    "dense-nq<nk": Case(Nq=17, Nk=70),
    "dense-nq1": Case(Nq=1, Nk=37),
    "dense-d40-dv24": Case(D=40, Dv=24),
    "dense-d59-f16": Case(D=59, dtype=_F16, Nq=33, Nk=41),
    "dense-strided-bnhd": Case(layout="bnhd", Nq=40, Nk=52),
    "dense-gqa": Case(H=4, Hkv=2, Nq=33, Nk=45),
    "dense-mqa-f16": Case(H=4, Hkv=1, dtype=_F16),
    "dense-softcap": Case(softcap=1.5, D=40),
    "dense-tiles-16x64": Case(Nq=70, Nk=90, configs=dict(fwd=T(16, 64), dkdv=T(64, 16), dq=T(16, 64))),
    # ---- parametric windows / causal / documents
    "causal": Case(),
    "causal-f16-gqa": Case(dtype=_F16, H=4, Hkv=2, Nq=50, Nk=50),
    "causal-nq<nk": Case(Nq=17, Nk=75),
    "causal-nq>nk": Case(Nq=75, Nk=20),        # the first 55 rows see no key
    "window-8": Case(lambda: patterns.sliding_window(8), Nq=70, Nk=70),
    "window-4-6-nq>nk": Case(lambda: patterns.sliding_window(4, 6), Nq=60, Nk=41),
    "window-per-head": Case(_window_heads, H=4, Hkv=2, Nq=64, Nk=57),
    "window-union": Case(lambda: patterns.sliding_window(3) | patterns.sliding_window(0, 5)),
    "window-and-causal-softcap": Case(lambda: patterns.sliding_window(10, 10) & patterns.causal(), softcap=2.0),
    "document": Case(lambda: patterns.document([7, 20, 4, 30]), Nq=61, Nk=61),
    "document-causal": Case(lambda: patterns.document([7, 20, 4, 30]) & patterns.causal(), Nq=61, Nk=61),
    "document-nq>nk": Case(lambda: patterns.document([13, 30]), Nq=60, Nk=40),
    "document-window": Case(lambda: patterns.document([33, 30]) & patterns.sliding_window(6, 2), Nq=50, Nk=63),
    # ---- block map + bit tiles
    "bigbird": Case(lambda: patterns.bigbird(block_size=16, window_blocks=3, global_blocks=2, random_blocks=1),
                    Nq=96, Nk=96),
    "random": Case(lambda: patterns.random(5, seed=3), Nq=33, Nk=70),
    "longformer": Case(lambda: patterns.longformer(8, [0, 37]), Nq=64, Nk=64),
    # band-and-globals patterns: the kernels evaluate the predicate (window + global flags)
    "longformer-nq>nk-gqa": Case(lambda: patterns.longformer(12, [0, 9, 40]), H=4, Hkv=2, Nq=75, Nk=50),
    "longformer-nq<nk-per-head": Case(lambda: patterns.longformer((4, 10, 2, 30), [5, 66]), H=4, Hkv=4,
                                     Nq=40, Nk=70),
    "global-tokens-only-softcap": Case(lambda: patterns.global_tokens([2, 33, 69]), Nq=50, Nk=70, softcap=2.0),
    "dilated": Case(lambda: patterns.dilated(12, 3), Nq=50, Nk=50),
    "strided": Case(lambda: patterns.strided(5, 7, local=2), Nq=40, Nk=45),
    "fixed": Case(lambda: patterns.fixed(16, 2), Nq=48, Nk=48),
    "exponential": Case(lambda: patterns.exponential(local=2), Nq=45, Nk=45),
    "global-tokens-or-window": Case(lambda: patterns.global_tokens([3, 30]) | patterns.sliding_window(4),
                                    Nq=40, Nk=40),
    "block-sparse": Case(lambda: patterns.block_sparse(torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]],
                                                                    dtype=torch.bool), 16), Nq=48, Nk=48),
    "mask-mod": Case(lambda: patterns.from_mask_mod(_mask_mod_prefix), Nq=40, Nk=40, dtype=_F16),
    "mask-mod-empty-rows": Case(lambda: patterns.from_mask_mod(_mask_mod_gaps), Nq=40, Nk=40),
    "random-and-causal-gqa": Case(lambda: patterns.random(6, seed=1) & patterns.causal(), H=4, Hkv=2, Nq=50,
                                  Nk=50),
    # ---- the map path for patterns that have a parametric one (both paths must agree)
    "map-causal": Case(patterns.causal, force_map=True, Nq=45, Nk=60),
    "map-window-per-head": Case(_window_heads, H=4, Hkv=4, force_map=True, Nq=64, Nk=64),
    "map-document-causal": Case(lambda: patterns.document([7, 20, 4, 30]) & patterns.causal(), force_map=True,
                                Nq=61, Nk=61),
    # ---- TMA loads (tensor descriptors; zero fill past the rows and the head dim)
    "tma-dense-d40": Case(D=40, Nq=45, Nk=70, configs=dict(fwd=T(32, 32, tma=True), dkdv=T(32, 32, tma=True),
                                                          dq=T(32, 32, tma=True))),
    "tma-causal-gqa-bnhd": Case(patterns.causal, H=4, Hkv=2, Nq=50, Nk=50, layout="bnhd",
                                configs=dict(fwd=T(32, 16, tma=True), dkdv=T(16, 32, tma=True),
                                             dq=T(32, 16, tma=True))),
    "tma-map-longformer": Case(lambda: patterns.longformer(10, [5]), Nq=70, Nk=75, map_blocks=((64, 32),),
                               configs=dict(fwd=T(32, 16, tma=True), dkdv=T(16, 32, tma=True),
                                            dq=T(16, 16, tma=True))),
    # ---- kernel tiles smaller than the map blocks (sub-tiles of a map tile)
    "map-subtiles": Case(lambda: patterns.longformer(10, [5]), Nq=70, Nk=75, map_blocks=((64, 32),),
                         configs=dict(fwd=T(32, 16), dkdv=T(16, 32), dq=T(16, 16))),
    "map-bigbird-64-softcap": Case(lambda: patterns.bigbird(block_size=16, random_blocks=2), Nq=100, Nk=100,
                                   map_blocks=((64, 64),), configs=dict(fwd=T(32, 32), dkdv=T(32, 64),
                                                                        dq=T(64, 16)), softcap=3.0),
}


# ---- split-KV forward (decoding-sized grids): n programs per (head, query block), merged
# through the lse; the backward is the usual one on the merged out / lse.
SPLIT_CASES = {
    "decode-causal-nq1": (Case(patterns.causal, Nq=1, Nk=300), 3),
    "decode-gqa-f16-nq2": (Case(dtype=_F16, H=4, Hkv=1, Nq=2, Nk=257), 4),
    "window-nq<nk": (Case(lambda: patterns.sliding_window(40, 3), Nq=20, Nk=230), 5),
    "documents-causal-empty-rows": (Case(lambda: patterns.document([50, 3, 90]) & patterns.causal(), Nq=143,
                                         Nk=143), 2),
    "causal-nq>nk-softcap-bnhd": (Case(patterns.causal, Nq=75, Nk=40, softcap=2.0, layout="bnhd", D=40), 7),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES), ids=list(SPLIT_CASES))
def test_split_kv_forward(name):
    c, n = SPLIT_CASES[name]
    with launch.force_kv_splits(n):
        check_case(c)
        q, k, v, _ = _make(c, 1)
        pat = c.pattern()
        split = memattn.attention(q, k, v, pattern=pat, backend="triton", return_lse=True)
    assert launch.kv_splits(10, 64, torch.device("cpu")) == 1           # the heuristic: no split on the CPU
    whole = memattn.attention(q, k, v, pattern=pat, backend="triton", return_lse=True)
    tol = 1e-5 if c.dtype == torch.float32 else 2e-3
    for a, b in zip(split, whole):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a))
        assert torch.allclose(a[fin].float(), b[fin].float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="positive int"):
        with launch.force_kv_splits(0):
            pass


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_forward_and_gradients(name):
    spec, _ = check_case(CASES[name])
    expect_map = CASES[name].force_map or name.replace("tma-", "").split("-")[0] not in (
        "dense", "causal", "window", "document")
    assert spec.path == ("map" if expect_map else "param")


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_dropout_mask_bit_exact(layout):
    """q = k = 0 gives uniform weights 1/Nk; v = one-hot keys makes out[i, j] = keep(i, j) / (Nk (1 - p))."""
    B, H, Hkv, N, p, seed = 2, 3, 1, 32, 0.37, 12345
    q = torch.zeros(B, H, 20, N)
    k = torch.zeros(B, Hkv, N, N)
    v = torch.eye(N).expand(B, Hkv, N, N).contiguous()
    if layout == "bnhd":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out, _ = tb.attention(q, k, v, pattern=None, scale=1.0, dropout_p=p, dropout_seed=seed)
    kept = out * N * (1 - p) > 0.5
    bh = (torch.arange(B)[:, None] * H + torch.arange(H)[None, :])[:, :, None, None]
    expect = keep_mask(seed, bh, torch.arange(20)[None, None, :, None], torch.arange(N)[None, None, None, :], p)
    assert torch.equal(kept, expect)
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1.0 / (N * (1 - p))), rtol=1e-6)


@pytest.mark.parametrize("pattern", [None, "causal", "bigbird"])
def test_dropout_matches_reference(pattern):
    """Outputs and gradients with dropout against the reference using the same seed."""
    pat = {None: None, "causal": patterns.causal(), "bigbird": patterns.bigbird(block_size=16, random_blocks=1)}[pattern]
    B, H, Hkv, N, D, p, seed = 1, 4, 2, 64, 32, 0.25, 99
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (H, Hkv, Hkv))
    do = torch.randn(B, H, N, D, generator=g)
    res = []
    for impl, dt in (("triton", torch.float32), ("ref", torch.float32), ("ref", torch.float64)):
        qq, kk, vv = (x.to(dt).requires_grad_(True) for x in (q, k, v))
        rp = pat.for_sizes(N, N) if pat is not None else None
        if impl == "triton":
            o, lse = tb.attention(qq, kk, vv, pattern=pat, scale=D ** -0.5, dropout_p=p, dropout_seed=seed)
        else:
            o, lse = reference.attention(qq, kk, vv, pattern=rp, scale=D ** -0.5, dropout_p=p, dropout_seed=seed)
        res.append((o.detach(), lse, *torch.autograd.grad(o, (qq, kk, vv), do.to(dt))))
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        assert_fa_rule(name, res[0][i], res[1][i], res[2][i], 2 if i < 2 else 3)


# ----------------------------------------------------------------------------- semantics
def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = (torch.randn(1, 2, n, 16) for n in (30, 10, 10))
    for x in (q, k, v):
        x.requires_grad_(True)
    out, lse = tb.attention(q, k, v, pattern=patterns.causal(), scale=0.25)
    # queries 0..19 sit at positions -20..-1: no key at or before them
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    grads = torch.autograd.grad(out.sum() + 0 * lse[torch.isfinite(lse)].sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :, :20], torch.zeros_like(grads[0][:, :, :20]))


def test_lse_gradient_flows():
    """A loss on lse too: d lse / d s = softmax, folded into the backward's delta."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.randn(1, 2, 40, generator=g, dtype=torch.float64)
    grads = []
    for impl in ("triton", "ref"):
        qq, kk, vv = (x.to(torch.float32 if impl == "triton" else torch.float64).requires_grad_(True) for x in (q, k, v))
        fn = tb.attention if impl == "triton" else reference.attention
        o, lse = fn(qq, kk, vv, pattern=patterns.causal(), scale=0.25)
        if impl == "ref":
            # the reference returns a detached lse: rebuild it differentiably
            s = (qq @ kk.transpose(-1, -2) * 0.25).masked_fill(~patterns.causal().dense(40, 40), float("-inf"))
            lse = torch.logsumexp(s, -1)
        loss = o.sum() + (lse * w.to(lse.dtype)).sum()
        grads.append(torch.autograd.grad(loss, (qq, kk, vv)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


def test_backward_is_deterministic():
    c = Case(lambda: patterns.bigbird(block_size=16, random_blocks=1), H=4, Hkv=2, Nq=64, Nk=64)
    q, k, v, do = _make(c)
    a = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    b = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_poisoned_outputs_are_fully_written(monkeypatch):
    monkeypatch.setenv("MEMATTN_POISON", "1")
    for pat in (None, patterns.causal(), patterns.random(3, seed=2) & patterns.causal()):
        q, k, v = (torch.randn(1, 2, n, 24, requires_grad=True) for n in (37, 45, 45))
        out, lse = tb.attention(q, k, v, pattern=pat, scale=0.2)
        assert not out.isnan().any() and not lse.isnan().any()
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert not any(g.isnan().any() for g in grads)


def test_map_rows_past_128_stay_inside_the_padded_lse_rows(monkeypatch):
    """Map blocks of 96 query rows and Nq = 100: the dK/dV loop's query tiles reach row 191,
    past Nq rounded up to 128; the backward's lse2 / delta rows (poisoned with NaN first) must
    be padded that far and written there, or the gradients go wrong."""
    monkeypatch.setenv("MEMATTN_POISON", "1")
    check_case(Case(lambda: patterns.random(3, seed=1) & patterns.causal(), Nq=100, Nk=100, H=2, Hkv=2,
                    force_map=True, map_blocks=((96, 32),)))


def test_attention_backward_from_final_out_lse():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    do = torch.randn(1, 4, 40, 16, generator=g)
    pat = patterns.sliding_window(9)
    out, lse = tb.attention(q, k, v, pattern=pat, scale=0.25)
    got = tb.attention_backward(q, k, v, out, do, lse, pattern=pat, scale=0.25)
    exp = reference.attention_backward(q, k, v, out, do, lse, pattern=pat, scale=0.25)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_public_api_dispatches_to_triton():
    q, k, v = (torch.randn(1, 2, 30, 16) for _ in range(3))
    out = memattn.attention(q, k, v, causal=True, backend="triton")
    ref = memattn.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_problem(monkeypatch):
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        tb.attention(q, q, q, pattern=None, scale=0.25)
    q = q.float()
    with pytest.raises(ValueError, match="head dims up to 256"):
        big = torch.randn(1, 1, 4, 300)
        tb.attention(big, big, big, pattern=None, scale=0.1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        tb.attention(q, q, q, pattern=None, scale=0.25)


def test_last_configs_replay_through_override():
    """What a benchmark records (last_configs) can be forced again (override_configs)."""
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    out = tb.attention(q, q, q, pattern=patterns.causal(), scale=0.25)[0]
    out.sum().backward()
    cfgs = launch.last_configs()
    assert set(cfgs) == {"fwd", "dkdv", "dq"}
    with launch.override_configs(**cfgs):
        tb.attention(q, q, q, pattern=patterns.causal(), scale=0.25)


def test_cached_plans_follow_new_tensors():
    """A second call with equal shapes but other tensors (and another layout) uses them."""
    for layout in ("bhnd", "bnhd"):
        c = Case(patterns.causal, Nq=40, Nk=40, layout=layout)
        for seed in (0, 1):
            check_case(c, seed=seed)


def test_config_must_divide_the_map():
    q = torch.randn(1, 2, 64, 16)
    spec = masks.describe(patterns.random(3), 64, 64, 2, "cpu", map_blocks=((32, 32),))
    from memattn.backends.triton.function import mask_args

    with launch.override_configs(fwd=T(64, 32)), pytest.raises(ValueError, match="divide the map"):
        launch.forward(q, q, q, mask_args(spec), scale=0.25)


def test_dkdv_query_tiles_are_capped_at_128_rows():
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    out, _ = tb.attention(q, q, q, pattern=patterns.causal(), scale=0.25)
    with launch.override_configs(dkdv=T(256, 32)), pytest.raises(ValueError, match="at most 128 rows"):
        out.sum().backward()


# ----------------------------------------------------------------------------- mask descriptions
def _unpack(bits: torch.Tensor, bm: int) -> torch.Tensor:
    """int32 (T, bm // 32, bn) -> bool (T, bm, bn)."""
    sh = torch.arange(32, dtype=torch.int64).view(1, 1, 32, 1)
    words = bits.to(torch.int64) & 0xFFFFFFFF
    return ((words[:, :, None, :] >> sh) & 1).bool().reshape(bits.shape[0], bm, bits.shape[2])


def _predicate_tile(spec, h: int, qb: int, kb: int, nq: int, nk: int) -> torch.Tensor:
    """The band-and-globals predicate of one map tile, from the spec's window and flags (what
    the kernels evaluate instead of reading bit tiles)."""
    bm, bn = spec.map_block
    left, right = spec.window[h if spec.window.shape[0] > 1 else 0].tolist()
    qi = torch.arange(qb * bm, (qb + 1) * bm)[:, None]
    kj = torch.arange(kb * bn, (kb + 1) * bn)[None, :]
    d = qi + (nk - nq) - kj
    flags, pmin = spec.doc_id.to(torch.int64), spec.doc_pmin
    gq = flags[qi.clamp(max=nq - 1) + (nk - nq) - pmin] != 0
    gk = flags[kj.clamp(max=nk - 1) - pmin] != 0
    return (((d <= left) & (d >= -right)) | gq | gk) & (qi < nq) & (kj < nk)


@pytest.mark.parametrize("pname", ["longformer", "longformer-per-head", "global-tokens", "per-head-window-or-global",
                                   "document-forced"])
def test_block_map_lists_and_bits_cover_the_pattern_exactly(pname):
    nq, nk, H = 70, 90, 3
    pat = {"longformer": patterns.longformer(10, [4, 50]),
           "longformer-per-head": patterns.longformer((2, 7, 30), [0, 61]),
           "global-tokens": patterns.global_tokens([3, 40, 89]),
           "per-head-window-or-global": patterns.sliding_window((2, 5, 9)) | patterns.global_tokens([7]),
           "document-forced": patterns.document([30, 25, 40]) & patterns.causal()}[pname]
    spec = masks.describe(pat, nq, nk, H, "cpu", force_map=True, map_blocks=((32, 32),))
    bm, bn = spec.map_block
    rowm, colm, bitm, rowf, colf = spec.fwd
    predicate = spec.info["tag"] == "map+pred"
    assert predicate == (pname in ("longformer", "longformer-per-head", "global-tokens"))
    unpacked = None if predicate else _unpack(spec.bits[0], bm)
    qbn, kbn = -(-nq // bm), -(-nk // bn)
    for h in range(H):
        dense = pat.dense(nq, nk, head=h if pat.heads > 1 else 0)
        hm = h if spec.map_heads > 1 else 0
        rebuilt = torch.zeros(qbn * bm, kbn * bn, dtype=torch.bool)
        for qb in range(qbn):
            r = hm * qbn + qb
            for e in range(int(rowf[r]), int(rowf[r + 1])):
                kb = int(colf[e])
                assert (qb + 1) * bm <= nq and (kb + 1) * bn <= nk, "a full-list tile crosses the bounds"
                rebuilt[qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn] = True
            for e in range(int(rowm[r]), int(rowm[r + 1])):
                kb = int(colm[e])
                rebuilt[qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn] = (
                    _predicate_tile(spec, h, qb, kb, nq, nk) if predicate else unpacked[int(bitm[e])])
        assert torch.equal(rebuilt[:nq, :nk], dense), f"head {h}"
        assert not rebuilt[nq:].any() and not rebuilt[:, nk:].any()
    # the transposed lists hold the same tiles
    rowm_t, colm_t, bitm_t, rowf_t, colf_t = spec.bwd
    assert rowm_t[-1] == rowm[-1] and rowf_t[-1] == rowf[-1]
    assert sorted(bitm_t.tolist()) == sorted(bitm.tolist())


def test_parametric_detection():
    pw = masks.parametric_window
    assert pw(None)[:2] == ([1 << 62], [1 << 62])
    assert pw(patterns.sliding_window(4) & patterns.causal())[:2] == ([4], [0])
    assert pw(patterns.sliding_window((1, 2)) | patterns.sliding_window(3, 1))[:2] == ([3, 3], [1, 1])
    assert pw(patterns.document([3, 4]) & patterns.causal())[2] == patterns.document([3, 4])
    for p in (patterns.dilated(4, 2), patterns.document([3, 4]) | patterns.causal(), patterns.longformer(4, [1]),
              patterns.document([3, 4]) & patterns.document([2, 5])):
        assert pw(p) is None, p


def test_spec_is_cached_and_small_for_causal():
    a = masks.describe(patterns.causal(), 1 << 20, 1 << 20, 16, "cpu")
    b = masks.describe(patterns.causal(), 1 << 20, 1 << 20, 16, "cpu")
    assert a is b and a.path == "param" and a.nbytes() <= 64


# ----------------------------------------------------------------------------- custom op / compile
def test_custom_ops_are_registered_and_pass_opcheck():
    import memattn.backends.triton.function  # noqa: F401 - registers the ops (the backend imports it lazily)

    assert hasattr(torch.ops.memattn, "triton_attn_fwd") and hasattr(torch.ops.memattn, "triton_attn_bwd")
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    spec = masks.describe(patterns.causal(), 20, 20, 2, "cpu")
    from memattn.backends.triton.function import _flat, mask_args

    args = (q, k, v, *_flat(mask_args(spec)), 0.25, 0.0, 0.0, 0)
    torch.library.opcheck(torch.ops.memattn.triton_attn_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("pname", ["causal", "bigbird-and-causal", "document"])
def test_torch_compile_traces_without_graph_break(pname):
    """Parametric and block-map paths, with the pattern combined inside the traced code."""
    pat = {"causal": None, "bigbird-and-causal": patterns.bigbird(block_size=16),
           "document": patterns.document([20, 30, 14])}[pname]

    def f(q, k, v):
        return memattn.attention(q, k, v, pattern=pat, causal=pname != "document", backend="triton") * 2

    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(q, k, v)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(q, k, v), f(q, k, v))


def test_every_launch_names_every_kernel_parameter():
    """A traced launch (wrap_triton) must name every parameter, defaulted constexprs too:
    Inductor's mutation analysis rejects a partial list and then treats every input as
    mutated, which broke the H200's compiled backward (session 15: DS_TMA was left to its
    default). Under the interpreter traced launches are skipped, so a launch hook reads the
    arguments of every kernel the forward and the three backward strategies launch."""
    missing: dict[str, set] = {}

    def hook(kernel, grid, kw):
        fn = getattr(kernel, "fn", kernel)
        names = getattr(kernel, "arg_names", None) or fn.arg_names
        missing.setdefault(fn.__name__, set()).update(a for a in names if a not in kw)

    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))
    launch.set_launch_hook(hook)
    try:
        for mode in ("two_pass", "atomic", "stored_ds"):
            with launch.using_backward(mode):
                for pat in (patterns.causal(), patterns.sliding_window(16), patterns.bigbird(block_size=16),
                            patterns.document([20, 30, 14])):
                    o = memattn.attention(q, k, v, pattern=pat, backend="triton", softcap=20.0)
                    torch.autograd.grad(o.sum(), (q, k, v))
        with launch.force_kv_splits(2):
            memattn.attention(q[:, :, :1], k, v, backend="triton")
    finally:
        launch.set_launch_hook(None)
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
            "_attn_bwd_dq_ds_kernel"} <= set(missing)
    assert all(not m for m in missing.values()), missing


@pytest.mark.parametrize("mode", ["two_pass", "atomic"])
def test_compiled_graph_matches_eager_forward_and_backward(mode):
    """A graph-capturing backend (aot_eager) runs the ops at run time: outputs and gradients
    equal eager's (under the interpreter the ops are opaque custom ops; before that, the
    traced graph held only the outputs' allocation)."""
    pat = patterns.bigbird(block_size=16)

    def f(q, k, v):
        return memattn.attention(q, k, v, pattern=pat, causal=True, backend="triton") * 2

    q, k, v = (torch.randn(2, 2, 48, 16, requires_grad=True) for _ in range(3))
    with launch.using_backward(mode):
        torch._dynamo.reset()
        want = f(q, k, v)
        gw = torch.autograd.grad(want.sum(), (q, k, v))
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
        gg = torch.autograd.grad(got.sum(), (q, k, v))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_compiled_backward_accumulates_like_eager():
    """attention_backward(accumulate_into=...) under torch.compile (the functional backward op,
    then in-place adds on the graph's inputs) gives what the eager kernels' in-place adds give."""
    from memattn.api import attention_backward

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    out, lse = memattn.attention(q, k, v, causal=True, backend="triton", return_lse=True)
    do = torch.randn(out.shape, generator=g)
    start = [torch.randn(t.shape, generator=g) for t in (q, k, v)]

    def f(q, k, v, out, do, lse, a, b, c):
        return attention_backward(q, k, v, out, do, lse, causal=True, backend="triton", accumulate_into=(a, b, c))

    eager = [t.clone() for t in start]
    f(q, k, v, out, do, lse, *eager)
    torch._dynamo.reset()
    compiled = [t.clone() for t in start]
    torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, out, do, lse, *compiled)
    for a, b, s0 in zip(compiled, eager, start):
        assert not torch.equal(a, s0)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- the GPU script
def test_gpu_script_cpu_side(tmp_path_factory):
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_triton.py"
    spec = importlib.util.spec_from_file_location("gpu_triton", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_triton"] = mod
    spec.loader.exec_module(mod)
    args = mod.parse_args(["--out", "/tmp/x", "--budget", "300", "--sections", "correctness,dense"])
    assert args.budget == 300 and args.sections == ["correctness", "dense"]
    with pytest.raises(SystemExit):
        mod.parse_args(["--sections", "nonsense"])
    rows = mod.correctness_cases()
    assert len(rows) == len(mod.HEAD_DIMS) * len(mod.SHAPES) * len(mod.FAMILIES)
    assert all({"family", "nq", "nk", "d", "layout"} <= set(r) for r in rows)
    for fam in mod.FAMILIES:                      # every family builds for every acceptance shape
        for nq, nk in mod.SHAPES:
            p = mod.make_pattern(fam, nq, nk, 4)
            if p is not None:
                p.for_sizes(nq, nk)
    assert mod.flops(1, 2, 3, 4) == 4 * 1 * 2 * 3 * 4 and mod.flops(1, 1, 1, 1, 3.5) == 14.0
    assert mod.allowed_pairs("window1024", 3000, None, "cpu") == pytest.approx(
        patterns.sliding_window(1024).density(3000, 3000) * 3000 ** 2, rel=1e-12)
    assert mod.allowed_pairs("documents16_causal", 1600, None, "cpu") == pytest.approx(
        (patterns.document([100] * 16) & patterns.causal()).density(1600, 1600) * 1600 ** 2, rel=1e-12)
    mod_fn, _ = mod.flex_setup("longformer", 600, 2, 16, "cpu")
    assert mod.allowed_pairs("longformer", 600, mod_fn, "cpu") == pytest.approx(
        patterns.longformer(512, list(range(16))).density(600, 600) * 600 ** 2, rel=1e-12)
    # backward strategies: variants of the timing rows and of the correctness grid
    assert mod._variant("atomic@0.5") == ("atomic", 0.5) and mod._variant("two_pass") == ("two_pass", None)
    a = mod.parse_args(["--out", "/tmp/x", "--check-bwd", "two_pass,atomic:64/128", "--bwd-variants", "atomic@1"])
    assert a.check_bwd == "two_pass,atomic:64/128" and a.bwd_variants == "atomic@1"
    # checkpoints: h200.json rewritten whole (a run cut at the device's limit keeps its rows)
    out = Path(tmp_path_factory.mktemp("gpu_triton"))
    assert mod.save({"correctness": [{"ok": True}]}, None) is None
    saved = mod.save({"correctness": [{"ok": True}]}, str(out))
    mod.save({"correctness": [{"ok": True}, {"ok": False}]}, str(out))
    assert saved == out / "h200.json" and len(json.loads(saved.read_text())["correctness"]) == 2
    assert not (out / "h200.json.tmp").exists()
    # the profile script's cases are timing cases of this script
    prof_path = path.parent / "gpu_profile.py"
    pspec = importlib.util.spec_from_file_location("gpu_profile", prof_path)
    prof = importlib.util.module_from_spec(pspec)
    pspec.loader.exec_module(prof)
    docs = prof.CASES["documents16"]
    for name, (kind, B, H, N, D) in prof.CASES.items():
        # the timing shapes (B * N = 16384, or one long sequence), or a document case's work as a batch
        assert B * N == 16384 or B == 1 or (name.endswith("_b16") and B * N == docs[1] * docs[3]), name
        mod.flex_setup(kind, 256, H, D, "cpu")
    assert prof._Energy("libmemattn_no_such_nvml.so").read() is None    # no NVML: no energy figure
    # the host-time script loads without a GPU (it needs one only to run)
    hspec = importlib.util.spec_from_file_location("gpu_host", path.parent / "gpu_host.py")
    host = importlib.util.module_from_spec(hspec)
    hspec.loader.exec_module(host)
    assert callable(host.main)


@pytest.mark.slow
def test_gpu_script_smoke_run(tmp_path):
    """The script's timing path end to end on the interpreter (tiny sizes, no peers)."""
    import json

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_triton.py"
    spec = importlib.util.spec_from_file_location("gpu_triton_smoke", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_triton_smoke"] = mod
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path), "--sections", "dense,determinism,decode",
                     "--budget", "300"]) == 0
    res = json.loads((tmp_path / "h200.json").read_text())
    assert res["decode"] and all(r["status"] == "ok" and r["check"]["err"] <= r["check"]["bound"]
                                 for r in res["decode"])
    rows = [r for r in res["dense"] if r["impl"] == "memattn"]
    assert len(rows) == 2 and all(r["status"] == "ok" and r["checked"] == "ok" for r in rows)
    assert all(r["status"] == "ok" and r["bit_identical"] for r in res["determinism"])
    assert [r["case"] for r in res["determinism"]][-1] == "direct_descs_d32"


def test_gpu_script_sustain_runs_back_to_back_and_resets_grads():
    """MEMATTN_BENCH_SUSTAIN_MS's helper: calls for the time asked, each after the grads reset."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_triton.py"
    spec = importlib.util.spec_from_file_location("gpu_triton_sustain", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.ones(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    assert mod._sustain(fn, 0.0, [x]) == 0 and seen == []
    t0 = time.perf_counter()
    n = mod._sustain(fn, 30.0, [x])
    assert (time.perf_counter() - t0) >= 0.03 and n == len(seen) >= 1 and all(seen)
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))   # the last call's grad only


def test_gpu_script_backward_variants_cap_their_own_scratch():
    """'MODE@MEM' rows: MEM caps the atomic accumulator (dq_memory) or the stored-dS scratch
    (ds_memory), and the strategy holds only inside the row."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_triton.py"
    spec = importlib.util.spec_from_file_location("gpu_triton_variants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = dict(launch._BWD)
    with mod._backward_scope(*mod._variant("stored_ds@1.5")):
        assert launch._BWD == dict(before, mode="stored_ds", ds_memory=1.5)
    with mod._backward_scope(*mod._variant("atomic@0.5")):
        assert launch._BWD == dict(before, mode="atomic", dq_memory=0.5)
    assert launch._BWD == before


def test_gpu_script_checks_timed_configs_at_the_rows_length_up_to_4096(monkeypatch):
    """_config_check runs the FA-rule check at min(N, 4096) tokens, so a length-dependent launch
    choice (the grouped dK/dV order above 2048) is the one timed; one check per size."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_triton.py"
    spec = importlib.util.spec_from_file_location("gpu_triton_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sizes = []

    def fake_check(case, dev, dtype, **kw):
        sizes.append((case["nq"], case["nk"]))
        return {"status": "ok"}

    monkeypatch.setattr(mod, "check_one", fake_check)
    monkeypatch.setattr(mod, "_CHECKED", {})
    cfgs = {"fwd": T(16, 16, 4, 1)}
    for n in (1024, 65536, 131072, 1024):
        assert mod._config_check("causal", 64, cfgs, "cpu", torch.float32, False, n) == "ok"
    assert sizes == [(1024, 1024), (4096, 4096)]
    assert mod._host_ms(lambda: None) is None or torch.cuda.is_available()     # no CUDA: no host figure


def test_gpu_host_floor_function_gives_gradients_of_the_right_shapes():
    """gpu_host --floor's bare autograd.Function: grads reset and set again, no kernel."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_host.py"
    spec = importlib.util.spec_from_file_location("gpu_host_floor", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(2))
    fb = mod._floor_fn(q, k, v, torch.randn(2, 4, 8, 16))
    for _ in range(2):
        fb()
        assert [t.grad.shape for t in (q, k, v)] == [q.shape, k.shape, v.shape]


def test_gpu_host_split_times_every_piece_and_restores_the_launcher():
    """gpu_host --split: forward, Tensor.backward, launch.backward and each launch timed
    without a profiler (kernels replaced by the launch hook); the patched names restored."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_host.py"
    spec = importlib.util.spec_from_file_location("gpu_host_split", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, 64, 32)
    orig = (launch.backward, launch._run_plan)
    slept = []
    plans.set_launch_hook(lambda kernel, grid, kw: None)
    try:
        r = mod.split_host(lambda: memattn.attention(q, k, v, pattern=patterns.causal(), backend="triton"),
                           do, (q, k, v), 3, sleep=lambda: slept.append(1))
    finally:
        plans.set_launch_hook(None)
    assert (launch.backward, launch._run_plan) == orig and slept == [1]
    assert set(r["run_plan"]) == {"fwd", "dq", "dkdv"} and r["main_thread_runs_backward"]
    assert 0 < r["launch_backward"] <= r["backward"] and r["fwd"] > 0
    assert r["run_plan"]["dq"] + r["run_plan"]["dkdv"] <= r["launch_backward"]


def test_gpu_host_raw_launch_switch_restores_the_setting_and_drops_plans():
    """gpu_host's A/B of the direct launcher's raw launches: the flag holds inside
    the block only, and plans built under either setting are dropped on entry and exit."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_host.py"
    spec = importlib.util.spec_from_file_location("gpu_host_descs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = plans._RAW[0]
    plans._PLANS["x"] = object()
    with mod._raw_launch(not before):
        assert plans._RAW[0] is (not before) and "x" not in plans._PLANS
        plans._PLANS["y"] = object()
    assert plans._RAW[0] is before and "y" not in plans._PLANS


def test_gpu_profile_forward_probe_bookkeeping(monkeypatch):
    """gpu_profile --fwd: kernel sums before and after, two do_bench medians, and the device
    allocations counted across the first do_bench only (profiler, do_bench and allocator
    statistics replaced: no GPU here)."""
    import triton.testing

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile_fwd", path)
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    kernels = iter([{"k1": 10.0, "k2": 2.5}, {"k1": 11.0, "k2": 2.5}])
    monkeypatch.setattr(prof, "kernel_times", lambda f, iters: next(kernels))
    allocs = iter([{"num_device_alloc": 4}, {"num_device_alloc": 7}])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a, **k: next(allocs))
    benches = iter([0.5, 0.25])
    monkeypatch.setattr(triton.testing, "do_bench", lambda f, **kw: next(benches))
    r = prof.forward_probe({"memattn": lambda: None, "flex": None}, 3)
    assert list(r) == ["memattn"]
    assert r["memattn"] == {"kernel_us": 12.5, "bench_ms": [0.5, 0.25], "kernel_us_after": 13.5,
                            "device_allocs_in_bench": 3, "kernels": {"k1": 10.0, "k2": 2.5}}


def test_gpu_profile_clocks_loop_on_the_cpu(monkeypatch):
    """gpu_profile.clocks's bookkeeping without a GPU: nvidia-smi and the CUDA sync replaced;
    two rounds per function, grads reset before every call, no NVML -> no energy figure."""
    import subprocess

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile_clocks", path)
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)

    class _Smi:
        def __init__(self, *a, **k):
            pass

        def terminate(self):
            pass

        def wait(self):
            pass

    monkeypatch.setattr(subprocess, "Popen", _Smi)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    real = prof._Energy
    monkeypatch.setattr(prof, "_Energy", lambda: real("libmemattn_no_such_nvml.so"))
    monkeypatch.setattr(prof.time, "sleep", lambda s: None)
    x = torch.ones(2, requires_grad=True)
    stale = []

    def fn():
        stale.append(x.grad is not None)
        (3 * x).sum().backward()

    out = prof.clocks({"a": fn, "b": fn}, (x,), seconds=0.02)
    assert set(out) == {"a", "b"}
    for r in out.values():
        assert len(r["ms_per_call"]) == 2 and all(t > 0 for t in r["ms_per_call"])
        assert r["mj_per_call"] == [None, None] and r["sm_mhz"] == []
    # only the untimed warm-up call of each span may see a stale gradient
    assert stale.count(True) <= 4 and stale.count(False) >= 4


@pytest.mark.slow
def test_gpu_tune_script_smoke_run(tmp_path):
    """scripts/gpu_tune.py end to end on the interpreter: compile, FA-rule check, timing, JSON."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    masks = ("full", "causal", "window1024")
    kernels = ("fwd", "dkdv", "dq", "dkdva")
    p = subprocess.run([sys.executable, str(root / "scripts" / "gpu_tune.py"), "--smoke", "--out", str(tmp_path),
                        "--masks", ",".join(masks), "--kernels", ",".join(kernels)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "tune.json").read_text())
    assert all(v == "ok" for v in res["checked"].values())
    assert {(r["kernel"], r["mask"]) for r in res["rows"]} == {(k, m) for k in kernels for m in masks}
    assert all(r["best"] is not None for r in res["rows"])
    assert all(r["best_ms_one_chunk"] > 0 for r in res["rows"] if r["kernel"] == "dkdva")
    spec = importlib.util.spec_from_file_location("gpu_tune_args", root / "scripts" / "gpu_tune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):       # a bad --extra is an argument error, not a crash
        mod.main(["--smoke", "--out", str(tmp_path), "--extra", "bogus:1,2"])
    with pytest.raises(SystemExit, match="--masks"):
        mod.main(["--smoke", "--out", str(tmp_path), "--masks", "causal,bogus"])
    with pytest.raises(SystemExit, match="--kernels"):
        mod.main(["--smoke", "--out", str(tmp_path), "--kernels", "fwd,bogus"])
    assert mod.parse_extra("dkdv:128,128,8,2;dq:64,64,4,3,tma") == {"dkdv": [(128, 128, 8, 2, False)],
                                                                     "dq": [(64, 64, 4, 3, True)]}


# ----------------------------------------------------------------------------- direct launches
class _FakeCompiled:
    """Stands in for triton's CompiledKernel: records what its launcher receives."""

    function, packed_metadata = "fn", "meta"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *a) -> None:
        self.calls.append(a)

    def launch_metadata(self, grid, stream, *args):  # pragma: no cover - only with a hook
        return None


def test_direct_launch_binds_arguments_in_kernel_order(monkeypatch) -> None:
    import inspect

    def kern(A, n, B, flag=7):      # the signature a JITFunction exposes
        pass

    class _Kernel:
        signature = inspect.signature(kern)

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 1234, raising=False)
    a, b = torch.zeros(8), torch.zeros(8)
    comp = _FakeCompiled()
    d = launch._Direct(_Kernel, comp, dict(B=b, A=a, n=3, num_warps=4))
    assert d((5,), dict(A=a, B=b, n=3, num_warps=4), 0)
    grid_and_meta, args = comp.calls[0][:9], comp.calls[0][9:]
    assert grid_and_meta[:5] == (5, 1, 1, 1234, "fn") and grid_and_meta[5] == "meta"
    assert args == (a, 3, b, 7)                    # kernel order, default filled in, no options
    # a tensor whose alignment or dtype differs from the compiled one is refused (the caller
    # then goes through triton's binder, which specialises again)
    assert not d((5,), dict(A=torch.zeros(9)[1:], B=b, n=3), 0)
    assert not d((5,), dict(A=a.half(), B=b, n=3), 0)
    assert len(comp.calls) == 1
    # with the per-call names of a cached plan, only those slots are rebound and checked: the
    # plan's fixed values come from the list bound at the first launch
    comp2 = _FakeCompiled()
    d2 = launch._Direct(_Kernel, comp2, dict(B=b, A=a, n=3, num_warps=4), per_call=("A",))
    a2 = torch.ones(8)
    assert d2((2,), dict(A=a2, B=b, n=3), 0)
    assert comp2.calls[0][9:] == (a2, 3, b, 7)
    assert not d2((2,), dict(A=a2.half(), B=b, n=3), 0)
    # the launcher keeps no per-call tensor alive once the call has returned (a kept output or
    # gradient would outlive its call: autograd then copies gradients instead of taking them)
    import gc
    import weakref

    a3 = torch.ones(8)
    ref = weakref.ref(a3)
    d3 = launch._Direct(_Kernel, _FakeCompiled(), dict(B=b, A=a3, n=3, num_warps=4), per_call=("A",))
    del a3
    gc.collect()
    assert ref() is None and d3.template[0] is None
    # a kernel argument without a value or a default is an error when the launcher is built
    with pytest.raises(TypeError, match="'n'"):
        launch._Direct(_Kernel, comp2, dict(A=a, B=b))


def test_cached_plan_launches_directly_with_only_its_per_call_values(monkeypatch) -> None:
    """_run_plan's direct path: a cached plan's launcher gets the plan's fixed values from its
    bound list and this call's tensors, seed and descriptors (a TensorDescriptor built from
    the named tensor when the config takes TMA, the tensor itself otherwise); a hook, a
    dispatch mode or another device sends the call through _launch instead."""
    import inspect

    from triton.tools.tensor_descriptor import TensorDescriptor

    def kern(A, AD, OUT, seed, n, flag=7):
        pass

    class _Kernel:
        signature = inspect.signature(kern)

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 99, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: -1, raising=False)   # CPU tensors: device -1
    for tma in (False, True):
        plan = plans._Plan(_Kernel, (4,), dict(n=11), T(32, 32, 1, 1, tma), "fwd", (("AD", "A", 8, 16),))
        assert plan.seeded is False and (plan.blocks == {"AD": [1, 1, 8, 16]} if tma else plan.blocks is None)
        plan.static["seed"] = 0
        plan.seeded = True
        a, out = torch.zeros(1, 2, 32, 16), torch.zeros(4)
        first = dict(A=a, AD=TensorDescriptor.from_tensor(a, [1, 1, 8, 16]) if tma else a, OUT=out, seed=5, n=11)
        comp = _FakeCompiled()
        plan.direct[-1] = launch._Direct(_Kernel, comp, first, ("A", "OUT", "seed", "AD"))
        before = launch.launch_counts()["direct"]
        a2, out2 = torch.ones(1, 2, 32, 16), torch.ones(4)
        plans._run_plan(plan, dict(A=a2, OUT=out2), -1)
        assert launch.launch_counts()["direct"] == before + 1 and launch.last_configs()["fwd"] == plan.cfg
        args = comp.calls[-1][9:]
        assert args[0] is a2 and args[2] is out2 and args[3] == 0x7FFFFFFF and args[4:] == (11, 7)
        if tma:
            assert isinstance(args[1], TensorDescriptor) and args[1].base is a2 and args[1].block_shape == [1, 1, 8, 16]
        else:
            assert args[1] is a2
        # not the direct path: a launch hook, or tensors on another device than the current one
        seen = []
        plans.set_launch_hook(lambda kernel, grid, kw: seen.append(kw))
        try:
            plans._run_plan(plan, dict(A=a2, OUT=out2), 3)
        finally:
            plans.set_launch_hook(None)
        assert len(comp.calls) == 1 and seen[0]["n"] == 11 and seen[0]["seed"] == 3
        assert isinstance(seen[0]["AD"], TensorDescriptor) if tma else seen[0]["AD"] is a2
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
        calls = []
        monkeypatch.setattr(plans, "_launch", lambda *a: calls.append(a))
        plans._run_plan(plan, dict(A=a2, OUT=out2), 3)
        assert len(calls) == 1 and len(comp.calls) == 1
        monkeypatch.undo()
        monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 99, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: -1, raising=False)


def test_direct_launch_expands_tensor_descriptors_as_triton_does(monkeypatch) -> None:
    """With Triton 3.6's launcher layout (CudaLauncher around wrap_handle_tensordesc), the
    direct launcher expands TMA descriptors itself: the raw launcher must receive exactly
    the arguments Triton's own wrapper gives it, and a map is encoded once per (address,
    shape, strides), again for a new address."""
    import inspect

    import triton
    from triton.backends.nvidia import driver as nv
    from triton.tools.tensor_descriptor import TensorDescriptor

    fills: list[tuple] = []

    def fill(ptr, swizzle, elem_size, dtype, block, shape, strides, padding):   # stands in for cuTensorMapEncodeTiled
        fills.append((ptr, tuple(shape)))
        return ("map", ptr, swizzle, elem_size, dtype, tuple(block), tuple(shape), tuple(strides), padding)

    class _Utils:
        fill_tma_descriptor = staticmethod(fill)

    class _Driver:
        utils = _Utils()

    monkeypatch.setattr(triton.runtime.driver, "_active", _Driver())   # restored after the test
    if True:
        def kern(A, AD, n, BD, flag=7):
            pass

        class _Kernel:
            signature = inspect.signature(kern)

        raw_calls: list[tuple] = []
        sig = {0: "*fp32", 1: "tensordesc<fp32[1, 1, 4, 8]>", 2: "i32", 3: "tensordesc<fp16[1, 1, 8, 16]>",
               4: "constexpr"}
        metas = [dict(swizzle=2, elem_size=4, elem_type=7, block_size=[1, 1, 4, 8], fp4_padded=False),
                 dict(swizzle=3, elem_size=2, elem_type=6, block_size=[1, 1, 8, 16], fp4_padded=False)]
        runner = object.__new__(nv.CudaLauncher)           # Triton's own __call__ and wrapper
        runner.__dict__.update(num_ctas=1, launch=nv.wrap_handle_tensordesc(lambda *a: raw_calls.append(a), sig, metas),
                               global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0,
                               profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=False)

        class _Compiled:
            function, packed_metadata, run = "fn", "meta", runner

        monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 1234, raising=False)

        def tensors():
            return torch.zeros(1, 2, 32, 8), torch.zeros(1, 2, 16, 16, dtype=torch.float16)

        a, b = tensors()
        per_call = ("A", "AD", "BD")
        first = dict(A=a, AD=TensorDescriptor.from_tensor(a, [1, 1, 4, 8]), n=5,
                     BD=TensorDescriptor.from_tensor(b, [1, 1, 8, 16]))
        monkeypatch.setattr(plans, "_RAW", [False])
        slow = launch._Direct(_Kernel, _Compiled(), first, per_call)
        assert slow.raw is None
        assert slow((3,), first, 0)                           # Triton's wrapper expands
        monkeypatch.setattr(plans, "_RAW", [True])
        d = launch._Direct(_Kernel, _Compiled(), first, per_call)
        assert d.raw is not None
        # a descriptor slot takes the tensor itself or a TensorDescriptor
        assert d((3,), dict(A=a, AD=a, n=5, BD=TensorDescriptor.from_tensor(b, [1, 1, 8, 16])), 0)
        assert raw_calls[1] == raw_calls[0]
        base = (3, 1, 1, 1234, "fn", False, False, None, None, "meta", None, None, None)
        assert raw_calls[1][:13] == base
        assert raw_calls[1][13] is a and raw_calls[1][14][:2] == ("map", a.data_ptr())
        assert raw_calls[1][15:23] == (1, 2, 32, 8, 512, 256, 8, 1)
        assert len(fills) == 4                                # two by Triton's wrapper, two here
        assert d((3,), dict(A=a, AD=a, n=5, BD=b), 0)         # same addresses: the maps are reused
        assert raw_calls[2] == raw_calls[0] and len(fills) == 4
        a2, b2 = tensors()                                    # new addresses: encoded again
        assert d((3,), dict(A=a2, AD=a2, n=5, BD=b2), 0)
        assert len(fills) == 6 and raw_calls[3][14][1] == a2.data_ptr()
        assert raw_calls[3][24][:2] == ("map", b2.data_ptr())
        # at most _DESC_CACHE_CAP maps per slot are kept
        keep = [tensors() for _ in range(plans._DESC_CACHE_CAP + 2)]
        for x, y in keep:
            d((3,), dict(A=x, AD=x, n=5, BD=y), 0)
        assert all(len(c) <= plans._DESC_CACHE_CAP for *_, c in d.raw.descs)
        # with a launch hook set, Triton's own path runs (it builds the hook's metadata)
        seen: list = []
        monkeypatch.setattr(plans._knobs.runtime, "launch_enter_hook", lambda meta: seen.append(meta))
        monkeypatch.setattr(_Compiled, "launch_metadata", lambda self, g, st, *a: "hookmeta", raising=False)
        n_fills = len(fills)
        assert d((3,), first, 0)
        assert raw_calls[-1][10:12] == ("hookmeta", plans._knobs.runtime.launch_enter_hook)
        assert raw_calls[-1][13:] == raw_calls[0][13:] and len(fills) == n_fills + 2
        # a launcher of another layout gets no raw path
        assert launch._Direct(_Kernel, _FakeCompiled(), first, per_call).raw is None
        # a kernel without descriptors: CudaLauncher holds the C launcher itself (no closure),
        # called with the same arguments as through CudaLauncher.__call__
        import functools

        plain = object.__new__(nv.CudaLauncher)
        plain.__dict__.update(runner.__dict__, launch=functools.partial(lambda *a: raw_calls.append(a)))

        class _Plain:
            function, packed_metadata, run = "fn", "meta", plain

        monkeypatch.setattr(plans._knobs.runtime, "launch_enter_hook", None)
        kw = dict(A=a, AD=a, n=5, BD=b)
        for on in (False, True):
            monkeypatch.setattr(plans, "_RAW", [on])
            dp = launch._Direct(_Kernel, _Plain(), kw, per_call)
            assert (dp.raw is not None and dp.raw.descs == ()) if on else dp.raw is None
            assert dp((2, 3), kw, 0)
        assert raw_calls[-1] == raw_calls[-2] == (2, 3, 1, 1234, "fn", False, False, None, None, "meta", None, None,
                                                  None, a, a, 5, b, 7)


# ----------------------------------------------------------------------------- longest-first order
@pytest.mark.parametrize("name", ["longformer-nq>nk-gqa", "bigbird", "random-and-causal-gqa", "map-subtiles",
                                  "tma-map-longformer", "map-bigbird-64-softcap"])
def test_longest_first_program_order(name):
    """Block-map launches with the program order permuted (forced on for every map launch
    here) give the same results as the reference."""
    old = launch._ORDER_SKEW[0]
    launch._ORDER_SKEW[0] = -1.0
    launch._VERSION[0] += 1                      # cached plans were built without an order
    try:
        check_case(CASES[name])
    finally:
        launch._ORDER_SKEW[0] = old
        launch._VERSION[0] += 1


def test_program_order_puts_global_rows_first():
    n = 4096                                     # the global row: 64 tiles, the others 3 or 4
    spec = masks.describe(patterns.longformer(16, [0, 1]), n, n, 2, "cpu", map_blocks=((64, 64),))
    m = tb.function.mask_args(spec)
    rows = launch._row_programs(1, 2, n // 32, 32, 64, 0, True, 1, torch.device("cpu"))
    order = launch._program_order(m.fwd, rows)
    assert order is not None and sorted(order.tolist()) == list(range(2 * n // 32))
    assert rows[order[:4].long()].tolist() == [0, 0, 0, 0]     # the global tokens' map row runs first
    even = masks.describe(patterns.sliding_window(64), n, n, 2, "cpu", map_blocks=((64, 64),),
                          force_map=True)
    assert launch._program_order(tb.function.mask_args(even).fwd, rows) is None


def test_launch_counts_follow_the_launches():
    q = torch.randn(1, 2, 40, 32, requires_grad=True)
    before = launch.launch_counts()
    memattn.attention(q, q, q, causal=True, backend="triton").sum().backward()
    after = launch.launch_counts()
    # forward, dQ (with the preprocessing), dK/dV: Triton's own launcher under the interpreter
    assert after["triton"] - before["triton"] == 3
    assert after["direct"] == before["direct"] and after["traced"] == before["traced"]


@pytest.mark.parametrize("pattern, band", [
    (lambda: patterns.sliding_window(64), True),
    (lambda: patterns.document([30, 40]) & patterns.causal(), True),
    (lambda: patterns.document([30, 40]), True),
    (lambda: patterns.causal(), False),
    (lambda: None, False),
    (lambda: patterns.bigbird(block_size=16, random_blocks=1), False),
], ids=("window", "docs_causal", "docs", "causal", "full", "map"))
def test_band_defaults_serve_windows_and_documents(pattern, band):
    """Windows and documents on the parametric path take the band tile defaults on the GPU
    (tuned on the H200 for short mask-bounded loops); other masks keep the dense ones."""
    from memattn.backends.triton import configs
    from memattn.backends.triton.function import mask_args

    m = mask_args(masks.describe(pattern(), 70, 70, 2, "cpu", map_blocks=((32, 32),)))
    assert launch._is_band(m) is band
    for kernel in ("fwd", "dkdv"):
        got = configs.candidates(kernel, torch.bfloat16, 128, "cuda", seq_len=65536, band=band)[0]
        dense = configs.candidates(kernel, torch.bfloat16, 128, "cuda", seq_len=65536)[0]
        assert got == (configs._GPU16_BAND[kernel][128] if band else dense)


@pytest.mark.parametrize("lengths, threshold, band", [
    ([30, 40], 4096, True), ([4096] * 4, 4096, False), ([4095, 4096, 4097], 4096, False),
    ([4000, 4100], 4096, True), ([5000, 3300], 4096, False), ([30, 40], 35, False), ([30, 40], 36, True),
    ([30, 40], 0, False),
])
def test_long_documents_take_the_dense_tiles(monkeypatch, lengths, threshold, band):
    """Documents whose mean length (positions per document) reaches _LONG_DOC run the dense
    tile defaults, shorter ones the band defaults; a window stays a band at any length."""
    from memattn.backends.triton.function import mask_args

    monkeypatch.setattr(launch, "_LONG_DOC", [threshold])
    n = sum(lengths)
    for causal in (False, True):
        pat = patterns.document(lengths) & patterns.causal() if causal else patterns.document(lengths)
        m = mask_args(masks.describe(pat, n, n, 2, "cpu"))
        assert launch._is_band(m) is band
    m = mask_args(masks.describe(patterns.sliding_window(64), n, n, 2, "cpu"))
    assert launch._is_band(m) is True


@pytest.mark.parametrize("pattern,causal", [
    (patterns.causal, True), (lambda: None, False), (lambda: patterns.sliding_window(8), False),
    (lambda: patterns.document([20, 12]) & patterns.causal(), False)], ids=("causal", "full", "window", "docs"))
def test_launcher_marks_plain_causal_masks(monkeypatch, pattern, causal):
    """The launcher asks for the short causal defaults for a plain causal mask only."""
    seen = []
    real = launch.candidates

    def spy(kernel, *args, **kwargs):
        seen.append((kernel, args[7] if len(args) > 7 else kwargs.get("causal", False)))
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(launch, "candidates", spy)
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    memattn.attention(q, k, v, pattern=pattern(), backend="triton").sum().backward()
    assert {kernel for kernel, _ in seen} >= {"fwd", "dkdv", "dq"}
    assert all(flag is causal for _, flag in seen)


@pytest.mark.parametrize("pattern,nq,nk,expect", [
    # (fwd / dQ LEAD, TRAIL), (dK/dV LEAD, TRAIL) at 32 x 32 tiles
    (lambda: None, 64, 64, ((False, False), (False, False))),
    (lambda: None, 70, 70, ((False, True), (False, True))),          # partial last blocks
    (patterns.causal, 64, 64, ((False, True), (True, False))),
    (patterns.causal, 70, 50, ((False, True), (True, True))),
    (lambda: patterns.sliding_window(8), 64, 64, ((True, True), (True, True))),
    (lambda: patterns.document([40, 24]) & patterns.causal(), 64, 64, ((True, True), (True, True))),
    (lambda: patterns.bigbird(block_size=16, random_blocks=1), 64, 64, ((True, True), (True, True))),
], ids=("full", "full-partial", "causal", "causal-partial", "window", "docs", "map"))
def test_edge_loops_compiled_out_only_where_empty(pattern, nq, nk, expect):
    """The launcher compiles out an edge loop only when the mask's tag and the block sizes
    prove it empty; windows, documents and block maps keep both."""
    from memattn.backends.triton.function import mask_args

    m = mask_args(masks.describe(pattern(), nq, nk, 2, "cpu", map_blocks=((32, 32),)))
    for kernel, (lead, trail) in zip(("fwd", "dkdv"), expect):
        got = launch._edge_loops(m, kernel, nq, nk, 32, 32)
        assert (got["LEAD"], got["TRAIL"]) == (lead, trail), kernel
    assert launch._edge_loops(m, "dq", nq, nk, 32, 32) == launch._edge_loops(m, "fwd", nq, nk, 32, 32)


def test_short_sequences_take_the_short_defaults():
    """N <= 4096 (queries and keys) selects the short-sequence defaults on the GPU tables;
    a longer sequence, or a longer key side, keeps the dense ones."""
    from memattn.backends.triton import configs

    for kernel in ("fwd", "dkdv"):
        short = configs.candidates(kernel, torch.bfloat16, 128, "cuda", seq_len=1024)[0]
        long_ = configs.candidates(kernel, torch.bfloat16, 128, "cuda", seq_len=16384)[0]
        assert short == configs._GPU16_SHORT[kernel][128]
        assert long_ == configs._GPU16[kernel][128][0] != short
    # a short causal forward at D = 64 takes its own default; full masks, longer sequences and
    # D = 128 do not
    short_causal = configs.candidates("fwd", torch.bfloat16, 64, "cuda", seq_len=1024, causal=True)[0]
    assert short_causal == configs._GPU16_CAUSAL_SHORT["fwd"][64]
    assert configs.candidates("fwd", torch.bfloat16, 64, "cuda", seq_len=1024)[0] != short_causal
    assert configs.candidates("fwd", torch.bfloat16, 64, "cuda", seq_len=4096, causal=True)[0] != short_causal
    assert configs.candidates("fwd", torch.bfloat16, 128, "cuda", seq_len=1024, causal=True)[0] == \
        configs._GPU16_SHORT["fwd"][128]
    # decoding keeps its own forward default even for a short cache
    assert configs.candidates("fwd", torch.bfloat16, 128, "cuda", seq_len=1024, q_len=1)[0] == \
        configs._GPU16_DECODE["fwd"][128]


# ----------------------------------------------------------------------------- atomic dQ
# The one-pass backward (launch.set_backward("atomic")): the dK/dV kernel also adds each
# tile's dS K into a float32 dQ accumulator; the dQ kernel is not launched.
ATOMIC_CASES = ["dense-f32", "dense-d59-f16", "dense-d40-dv24", "dense-gqa", "dense-mqa-f16", "dense-softcap",
                "dense-strided-bnhd", "causal-nq>nk", "window-per-head", "document-causal", "document-nq>nk",
                "bigbird", "longformer-nq>nk-gqa", "mask-mod-empty-rows", "map-bigbird-64-softcap",
                "tma-causal-gqa-bnhd", "dense-tiles-16x64"]


@pytest.mark.parametrize("name", ATOMIC_CASES, ids=ATOMIC_CASES)
def test_atomic_dq_backward(name):
    launch._LAST.clear()
    with launch.using_backward("atomic"):
        check_case(CASES[name])
    assert "dkdv" in launch.last_configs() and "dq" not in launch.last_configs()


@pytest.mark.parametrize("dq_memory", [1e-9, 0.3])
def test_atomic_dq_in_chunks_of_heads(dq_memory):
    """A capped accumulator runs the (batch, kv head) pairs in chunks (1e-9: one pair per
    chunk, 0.3: two of the four); each chunk's rows land in their own heads of dq."""
    c = Case(patterns.causal, B=2, H=4, Hkv=2, Nq=40, Nk=52, layout="bnhd")
    q, k, v, do = _make(c)
    with launch.using_backward("two_pass"):
        ref = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    with launch.using_backward("atomic", dq_memory=dq_memory):
        got = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert got[0].stride() == q.stride()           # dq keeps q's (B, N, H, D) memory layout


def test_atomic_dq_with_dropout_matches_two_pass():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, h, 48, 32, generator=g) for h in (4, 2, 2))
    do = torch.randn(1, 4, 48, 32, generator=g)
    grads = []
    for mode in ("two_pass", "atomic"):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        with launch.using_backward(mode):
            o, _ = tb.attention(qq, kk, vv, pattern=patterns.causal(), scale=0.2, dropout_p=0.3, dropout_seed=5)
            grads.append(torch.autograd.grad(o, (qq, kk, vv), do))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_deterministic_algorithms_take_the_two_pass_backward():
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with launch.using_backward("atomic"):
            launch._LAST.clear()
            q = torch.randn(1, 2, 40, 32, requires_grad=True)
            memattn.attention(q, q, q, causal=True, backend="triton").sum().backward()
            assert "dq" in launch.last_configs()
    finally:
        torch.use_deterministic_algorithms(prev)


# ----------------------------------------------------------------------------- stored dS
# launch.set_backward("stored_ds"): the dK/dV kernel also writes each tile's dS to a scratch
# buffer and the dQ pass (_attn_bwd_dq_ds_kernel) reads it back; parametric masks only.
STORED_CASES = ["dense-f32", "dense-d59-f16", "dense-d40-dv24", "dense-gqa", "dense-mqa-f16", "dense-softcap",
                "dense-strided-bnhd", "dense-nq1", "dense-tiles-16x64", "causal", "causal-nq>nk", "causal-nq<nk",
                "window-8", "window-4-6-nq>nk", "window-per-head", "window-union", "window-and-causal-softcap",
                "document", "document-causal", "document-nq>nk", "document-window", "tma-causal-gqa-bnhd"]


@pytest.mark.parametrize("name", STORED_CASES, ids=STORED_CASES)
def test_stored_ds_backward(name, monkeypatch):
    """By the FA rule, with every buffer poisoned with NaN first: a dQ read of a scratch slot
    the dK/dV pass did not write would turn dq into NaN."""
    monkeypatch.setenv("MEMATTN_POISON", "1")
    names = _launched(monkeypatch)
    with launch.using_backward("stored_ds"):
        check_case(CASES[name])
    assert names[1:] == ["pre", "dkdv", "dqds"], names


@pytest.mark.parametrize("name,kv_tile,dq_rows", [("window-per-head", (16, 32), 64),
                                                  ("document-window", (32, 16), 16),
                                                  ("causal-nq>nk", (16, 16), 64),
                                                  ("document-nq>nk", (16, 32), 32)])
def test_stored_ds_dq_tile_other_than_the_dkdv_tile(name, kv_tile, dq_rows, monkeypatch):
    """On the GPU the dQ pass reads the panels in tiles of 128 query rows while the dK/dV pass
    writes them in its own (e.g. 32): columns of a tile that a key block's query range leaves
    out must read as zeros, whichever tile is larger."""
    monkeypatch.setenv("MEMATTN_POISON", "1")
    monkeypatch.setattr(launch, "_DQDS_BM", [dq_rows])
    c = CASES[name]
    c = Case(**{**c.__dict__, "configs": dict(dkdv=T(*kv_tile))})
    with launch.using_backward("stored_ds"):
        check_case(c)
    assert launch.last_configs()["dqds"].block_m == dq_rows


@pytest.mark.parametrize("name", ["bigbird", "longformer-nq>nk-gqa", "map-window-per-head"])
def test_stored_ds_falls_back_to_two_pass_on_block_maps(name, monkeypatch):
    names = _launched(monkeypatch)
    with launch.using_backward("stored_ds"):
        check_case(CASES[name])
    assert "dqds" not in names and names[-2:] == ["dq", "dkdv"], names


def test_stored_ds_scratch_takes_at_most_half_the_free_memory(monkeypatch):
    """On the GPU the scratch is also capped by half the free device memory (read when the
    plan is built): here 'free' is set to three (batch, kv head) pairs' scratch, so the pairs
    run one per chunk (1.5 of them fit)."""
    c = Case(lambda: patterns.sliding_window(9) & patterns.causal(), B=2, H=4, Hkv=2, Nq=70, Nk=70)
    q, k, v, do = _make(c)
    with launch.using_backward("two_pass"):
        ref = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    kv = launch.candidates("dkdv", torch.float32, 32, "cpu")[0]
    span = launch._ds_span(launch.MaskArgs(window=torch.tensor([[9, 0]], dtype=torch.int32)), 70, 70,
                           kv.block_m, kv.block_n)
    unit = 2 * -(-70 // kv.block_n) * kv.block_n * span * 4            # GROUP heads, float32
    monkeypatch.setattr(launch, "_free_device_bytes", lambda device: 3.0 * unit)
    names = _launched(monkeypatch)
    with launch.using_backward("stored_ds"):
        got = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    assert names.count("dqds") == 4, names                              # B * Hkv = 4 pairs, one per chunk
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("ds_memory", [1e-9, 0.3, 2.0])
def test_stored_ds_in_chunks_of_heads(ds_memory, monkeypatch):
    """A capped scratch runs the (batch, kv head) pairs in chunks (0.3: two of the four pairs
    per chunk here, 2.0: all at once); with not even one pair fitting (1e-9) the two-pass
    form runs. Gradients equal the two-pass ones whichever way (same tiles, same order)."""
    c = Case(lambda: patterns.sliding_window(9) & patterns.causal(), B=2, H=4, Hkv=2, Nq=70, Nk=70,
             layout="bnhd")
    q, k, v, do = _make(c)
    with launch.using_backward("two_pass"):
        ref = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    monkeypatch.setenv("MEMATTN_POISON", "1")
    names = _launched(monkeypatch)
    with launch.using_backward("stored_ds", ds_memory=ds_memory):
        got = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
    chunks = {1e-9: 0, 0.3: 2, 2.0: 1}[ds_memory]
    assert names.count("dqds") == chunks and names.count("dkdv") == max(chunks, 1), names
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert got[0].stride() == q.stride()


def test_stored_ds_span_counts_the_widest_key_block():
    """The scratch panel's width: the most query rows (whole query blocks) any key block visits."""
    from memattn.backends.triton.function import mask_args

    def span(pat, nq, nk, bm, bn, heads=1):
        return launch._ds_span(mask_args(masks.describe(pat, nq, nk, heads, "cpu")), nq, nk, bm, bn)

    # window 100 (causal): keys [64, 128) are seen by rows [64, 227] -> query blocks 2..7 of 32
    assert span(patterns.sliding_window(100) & patterns.causal(), 512, 512, 32, 64) == 6 * 32
    assert span(patterns.causal(), 256, 256, 32, 64) == 256                 # key block 0: every row
    assert span(None, 100, 70, 32, 32) == 128                               # full: every query block
    # documents: keys [64, 96) lie in document 1 (rows 70..169) and before -> rows [64, 170)
    assert span(patterns.document([70, 100, 86]) & patterns.causal(), 256, 256, 32, 32) == 4 * 32
    # per head (left, right): head 3 (40, 1), Nq 64 > Nk 57: keys [0, 16) seen by rows 7..63
    assert span(_window_heads(), 64, 57, 16, 16, heads=4) == 64


def test_stored_ds_with_an_lse_gradient_matches_two_pass():
    """An lse gradient enters through delta, which the dK/dV pass reads before it writes dS."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=g) for _ in range(3))
    grads = []
    for mode in ("two_pass", "stored_ds"):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        with launch.using_backward(mode):
            out, lse = tb.attention(qq, kk, vv, pattern=patterns.sliding_window(7) & patterns.causal(), scale=0.25)
            grads.append(torch.autograd.grad(out.sum() + (lse * lse).sum(), (qq, kk, vv)))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)


def test_stored_ds_with_dropout_matches_two_pass_bit_for_bit():
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, h, 48, 32, generator=g) for h in (4, 2, 2))
    do = torch.randn(1, 4, 48, 32, generator=g)
    grads = []
    for mode in ("two_pass", "stored_ds", "stored_ds"):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        with launch.using_backward(mode):
            o, _ = tb.attention(qq, kk, vv, pattern=patterns.sliding_window(20) & patterns.causal(), scale=0.2,
                                dropout_p=0.3, dropout_seed=5)
            grads.append(torch.autograd.grad(o, (qq, kk, vv), do))
    for a, b, c in zip(*grads):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)
        assert torch.equal(b, c)                   # no atomics: two runs are bit-identical


def test_set_backward_validates_and_restores():
    before = dict(launch._BWD)
    with pytest.raises(ValueError, match="mode must be"):
        launch.set_backward("fast")
    with pytest.raises(ValueError, match="dq_memory must be > 0"):
        launch.set_backward(dq_memory=0.0)
    with pytest.raises(ValueError, match="ds_memory must be > 0"):
        launch.set_backward(ds_memory=-1.0)
    with launch.using_backward("atomic", dq_memory=0.5):
        assert launch._BWD == dict(before, mode="atomic", dq_memory=0.5)
    with launch.using_backward("stored_ds", ds_memory=3.0):
        assert launch._BWD == dict(before, mode="stored_ds", ds_memory=3.0)
    assert launch._BWD == before
    from memattn.backends.triton import configs

    # the atomic pass has its own tile list on the GPU (8 warps at D = 128), the dK/dV one's
    # lists elsewhere (the interpreter)
    for d in (64, 128):
        assert configs.candidates("dkdva", torch.bfloat16, d, "cuda", seq_len=16384)[0] == configs._GPU16["dkdva"][d][0]
    assert configs.candidates("dkdva", torch.float32, 64, "cpu") == configs.candidates("dkdv", torch.float32, 64, "cpu")


# ----------------------------------------------------------------------------- fused preprocessing
# The two-pass backward's dQ launch computes delta = rowsum(dO * O) and lse2 itself and runs
# first (launch._FUSE_PRE); the separate preprocessing kernel serves dlse and the atomic pass.
def _launched(monkeypatch) -> list[str]:
    names: list[str] = []
    real = launch._run_plan

    def spy(plan, tensors, seed):
        names.append(plan.name)
        return real(plan, tensors, seed)

    monkeypatch.setattr(launch, "_run_plan", spy)
    return names


@pytest.mark.parametrize("name", ["dense", "causal_gqa", "documents", "map_bits"])
def test_fused_preprocessing_matches_the_separate_kernel(monkeypatch, name):
    pat = {"dense": lambda: None, "causal_gqa": patterns.causal,
           "documents": lambda: patterns.document([20, 31, 19]) & patterns.causal(),
           "map_bits": lambda: patterns.random(3, seed=4) & patterns.causal()}[name]
    c = Case(pat, H=4, Hkv=2 if name == "causal_gqa" else 4, Nq=70, Nk=70, force_map=name == "map_bits")
    monkeypatch.setenv("MEMATTN_POISON", "1")     # the padding rows must be written by the dQ launch
    q, k, v, do = _make(c, seed=3)
    names = _launched(monkeypatch)
    grads = {}
    for fuse in (True, False):
        monkeypatch.setattr(launch, "_FUSE_PRE", [fuse])
        names.clear()
        grads[fuse] = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[3:]
        assert names[1:] == (["dq", "dkdv"] if fuse else ["pre", "dkdv", "dq"]), names   # names[0]: forward
    for a, b in zip(grads[True], grads[False]):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    check_case(c, seed=3)                          # and by the rule, against the float64 oracle


def test_lse_gradient_takes_the_preprocessing_kernel(monkeypatch):
    names = _launched(monkeypatch)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    out, lse = tb.attention(q, k, v, pattern=patterns.causal(), scale=0.25)
    names.clear()
    torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert names == ["pre", "dkdv", "dq"]
    names.clear()
    out, lse = tb.attention(q, k, v, pattern=patterns.causal(), scale=0.25)
    names.clear()
    torch.autograd.grad(out.sum(), (q, k, v))
    assert names == ["dq", "dkdv"]


# ----------------------------------------------------------------------------- grid order
def test_grid_order_groups_cover_every_program_once():
    """common._grid_pos as Python: for any group size every (head, query block) is one
    program, and inside a group the last query blocks come first."""
    def pos(pid, num_m, bh, hg):
        per = hg * num_m
        grp, r = divmod(pid, per)
        gh = min(hg, bh - grp * hg)
        return grp * hg + r % gh, num_m - 1 - r // gh

    for bh, num_m, hg in ((7, 5, 1), (7, 5, 3), (16, 4, 16), (5, 3, 8), (1, 9, 4)):
        got = [pos(p, num_m, bh, hg) for p in range(bh * num_m)]
        assert sorted(got) == [(h, m) for h in range(bh) for m in range(num_m)]
        if hg > 1 and bh >= hg:
            assert [m for _, m in got[:hg]] == [num_m - 1] * hg
    src = Path(tb.__file__).parent.joinpath("common.py").read_text()   # the kernel helper says the same
    assert "bh = grp * hgroup + r % gh" in src and "m = num_m - 1 - r // gh" in src


@pytest.mark.parametrize("hgroup,hq,hkv", [(3, 3, 3), (16, 3, 3), (3, 4, 2)])
def test_grouped_grid_order_gives_the_same_results(monkeypatch, hgroup, hq, hkv):
    """Forward, dQ and dK/dV in grouped order (forced with launch._HGROUP_KV): bit-identical,
    also with GQA (two query heads per kv head, groups across batch entries)."""
    c = Case(patterns.causal, B=2, H=hq, Hkv=hkv, Nq=70, Nk=70,
             configs=dict(fwd=T(16, 16, 4, 1), dq=T(16, 16, 4, 1), dkdv=T(16, 16, 4, 1)))
    q, k, v, do = _make(c, seed=7)
    monkeypatch.setattr(launch, "_HGROUP", [1])
    monkeypatch.setattr(launch, "_HGROUP_KV", [1])
    base = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[1:]
    monkeypatch.setattr(launch, "_HGROUP", [hgroup])
    monkeypatch.setattr(launch, "_HGROUP_KV", [hgroup])
    got = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[1:]
    for a, b in zip(base, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pat", [lambda: patterns.sliding_window(20),
                                 lambda: patterns.document([30, 40]) & patterns.causal()],
                         ids=["window", "documents"])
def test_grouped_grid_order_for_other_tags_gives_the_same_results(monkeypatch, pat):
    """MEMATTN_TRITON_HGROUP_TAGS (launch._HGROUP_TAGS) extends the grouped order to windows
    and documents: bit-identical outputs and gradients, and the tag really switches it on."""
    from memattn.backends.triton.function import mask_args

    c = Case(pat, B=2, H=3, Hkv=3, Nq=70, Nk=70,
             configs=dict(fwd=T(16, 16, 4, 1), dq=T(16, 16, 4, 1), dkdv=T(16, 16, 4, 1)))
    q, k, v, do = _make(c, seed=8)
    m = mask_args(masks.describe(pat(), 70, 70, 3, "cpu"))
    monkeypatch.setattr(launch, "_HGROUP_KV", [None])
    base = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[1:]
    assert launch._hgroup(m) == 1
    monkeypatch.setattr(launch, "_HGROUP_TAGS", [frozenset({"causal", m.tag})])
    monkeypatch.setattr(launch, "_HGROUP", [3])
    assert launch._hgroup(m) == 3 and launch._hgroup_kv(m, False, 4096) == 16
    monkeypatch.setattr(launch, "_HGROUP_KV", [3])
    got = _run_triton(c, q, k, v, do, c.pattern(), 0.2)[1:]
    for a, b in zip(base, got):
        assert torch.equal(a, b)


def test_grouped_grid_order_only_for_plain_causal_masks():
    from memattn.backends.triton.function import mask_args

    def tag_group(pat, **kw):
        return launch._hgroup(mask_args(masks.describe(pat, 64, 64, 2, "cpu", **kw)))

    assert tag_group(patterns.causal()) == launch._HGROUP[0] == 16
    for pat in (None, patterns.sliding_window(8), patterns.document([30, 34]) & patterns.causal()):
        assert tag_group(pat) == 1
    assert tag_group(patterns.causal(), force_map=True) == 1
    causal = mask_args(masks.describe(patterns.causal(), 64, 64, 2, "cpu"))
    # dK/dV: grouped by default only where it takes its long-sequence tiles (above 2048)
    if launch._HGROUP_KV[0] is None:                 # MEMATTN_TRITON_HGROUP_DKDV unset
        assert launch._hgroup_kv(causal, False, 2048) == 1
        assert launch._hgroup_kv(causal, False, 4096) == 16
    assert launch._hgroup_kv(causal, True, 4096) == 1                   # atomic chunks
    window = mask_args(masks.describe(patterns.sliding_window(8), 64, 64, 2, "cpu"))
    assert launch._hgroup_kv(window, False, 4096) == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "_HGROUP_KV", [8])                           # forced at every length
        assert launch._hgroup_kv(causal, False, 64) == launch._hgroup_kv(causal, False, 4096) == 8
        assert launch._hgroup_kv(causal, True, 4096) == 1


# ----------------------------------------------------------------------------- accumulate_into
def _mask_args(spec):
    from memattn.backends.triton.function import mask_args
    return mask_args(spec)


ACCUM_CASES = (
    # (id, pattern, B, Hq, Hkv, N, D, dtype, backward mode, gradients as row views of larger buffers)
    ("causal-gqa-f32", patterns.causal, 2, 4, 2, 70, 32, torch.float32, "two_pass", False),
    ("window-f32-views", lambda: patterns.sliding_window(20), 1, 2, 2, 70, 40, torch.float32, "two_pass", True),
    ("documents-f16", lambda: patterns.document([30, 40]) & patterns.causal(), 1, 2, 1, 70, 32, torch.float16,
     "two_pass", True),
    ("bigbird-map-f32-atomic-mode", lambda: patterns.bigbird(block_size=16, window_blocks=1, global_blocks=1, random_blocks=1), 1, 2, 2, 64, 32,
     torch.float32, "atomic", False),
)


@pytest.mark.parametrize("case", ACCUM_CASES, ids=[c[0] for c in ACCUM_CASES])
def test_backward_accumulates_into_given_tensors(case):
    """launch.backward(accumulate_into=...): the kernels add dq, dk, dv to the given tensors
    (views of larger buffers too, whose other rows stay untouched), equal to adding the
    returned gradients (bit-identical in float32); any backward mode runs two-pass."""
    _, pat, B, Hq, Hkv, N, D, dtype, mode, views = case
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, N, D, generator=g).to(dtype) for _ in range(2))
    do = torch.randn(B, Hq, N, D, generator=g).to(dtype)
    m = _mask_args(masks.describe(pat(), N, N, Hq, "cpu"))
    cfg = dict(fwd=T(16, 16, 4, 1), dq=T(16, 16, 4, 1), dkdv=T(16, 16, 4, 1))
    with launch.override_configs(**cfg):
        out, lse = launch.forward(q, k, v, m, scale=D ** -0.5)
        fresh = launch.backward(q, k, v, out, do, lse, m, scale=D ** -0.5)
        bufs, accs = [], []
        for t in (q, k, v):
            if views:          # rows 3 .. 3 + N of a longer buffer: strided, offset views
                big = torch.randn(t.shape[0], t.shape[1], N + 7, t.shape[3], generator=g).to(dtype)
                bufs.append((big, big.clone()))
                accs.append(big[:, :, 3:3 + N])
            else:
                accs.append(torch.randn(t.shape, generator=g).to(dtype))
        before = [a.clone() for a in accs]
        with launch.using_backward(mode):
            got = launch.backward(q, k, v, out, do, lse, m, scale=D ** -0.5, accumulate_into=tuple(accs))
    assert all(r is a for r, a in zip(got, accs))
    for name, a, b0, f in zip(("dq", "dk", "dv"), accs, before, fresh):
        want = b0.float() + f.float()
        if dtype == torch.float32:
            assert torch.equal(a, want), name
        else:      # round(before + g) against before + round(g): each rounding is within eps / 2
            eps = torch.finfo(dtype).eps
            bound = eps * (want.abs() + f.float().abs()) + torch.finfo(dtype).tiny
            assert ((a.float() - want).abs() <= bound).all(), name
    for big, orig in bufs:
        assert torch.equal(big[:, :, :3], orig[:, :, :3]) and torch.equal(big[:, :, 3 + N:], orig[:, :, 3 + N:])


def test_accumulate_into_errors_name_the_argument():
    q = torch.randn(1, 2, 16, 32)
    m = _mask_args(masks.describe(patterns.causal(), 16, 16, 2, "cpu"))
    with launch.override_configs(fwd=T(16, 16, 4, 1), dq=T(16, 16, 4, 1), dkdv=T(16, 16, 4, 1)):
        out, lse = launch.forward(q, q, q, m, scale=0.2)
        with pytest.raises(ValueError, match="accumulate_into's dk must be"):
            launch.backward(q, q, q, out, out, lse, m, scale=0.2,
                            accumulate_into=(torch.zeros_like(q), torch.zeros(1, 2, 15, 32), torch.zeros_like(q)))
        with pytest.raises(ValueError, match="accumulate_into's dq must be .*float32"):
            launch.backward(q, q, q, out, out, lse, m, scale=0.2,
                            accumulate_into=(torch.zeros_like(q, dtype=torch.float64),) + (torch.zeros_like(q),) * 2)
        with pytest.raises(TypeError, match="accumulate_into must be a tuple"):
            launch.backward(q, q, q, out, out, lse, m, scale=0.2, accumulate_into=torch.zeros_like(q))
