"""The cpu backend against the reference and the float64 oracle (design.md §4).

Every check covers out, lse and dq, dk, dv with the FlashAttention rule (tests/_errors.py).
Tile sizes are forced small in many cases (``cpu.tile_sizes``) so that even short sequences
cross many tiles, partial last blocks and full/partial tile mixes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar

import pytest
import torch

import memattn
from memattn import patterns as P
from memattn.backends import cpu, reference
from memattn.patterns import Pattern

from _errors import check_attention, check_close, run_attention

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _inputs(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, Dv: int, dtype: torch.dtype, strided: bool,
            seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard normal inputs; ``strided`` builds them as (B, N, H, D) and transposes (no copy)."""
    gen = torch.Generator().manual_seed(seed)

    def make(H: int, N: int, d: int) -> torch.Tensor:
        if strided:
            return torch.randn(B, N, H, d, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(B, H, N, d, generator=gen).to(dtype)

    return make(Hq, Nq, D), make(Hkv, Nk, D), make(Hkv, Nk, Dv)


def _tiles(t: tuple[int, int] | None):
    return cpu.tile_sizes(*t) if t is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------- shapes grid
@dataclass(frozen=True)
class Case:
    id: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype
    causal: bool = False
    softcap: float = 0.0
    strided: bool = False
    tiles: tuple[int, int] | None = None   # None: the backend's own choice
    Dv: int | None = None


# Every N in {1, 17, 113, 203, 1000, 1023} and every D in {40, 59, 64, 80, 96, 111, 128, 256}
# appears; Nq != Nk, strided (transposed (B, N, H, D)) inputs, GQA 2:1 and MQA, causal,
# softcap, rows with no allowed key (causal with Nq > Nk), float32 / bfloat16 / float16.
GRID = (
    # (Nq = 1 rows: enough batch·heads that the lse comparison has a sample, see _errors.py)
    Case("n1x17-d64-f32-gqa2", 2, 8, 4, 1, 17, 64, F32),
    Case("n1x113-d40-bf16-causal-gqa2-decode", 2, 8, 4, 1, 113, 40, BF16, causal=True),
    Case("n17-d59-f32-causal-t8x4", 1, 3, 3, 17, 17, 59, F32, causal=True, tiles=(8, 4)),
    Case("n113x203-d80-f32-gqa2-t32x64", 2, 4, 2, 113, 203, 80, F32, tiles=(32, 64)),
    Case("n203x113-d96-bf16-causal-mqa-emptyrows-t64x32", 1, 4, 1, 203, 113, 96, BF16, causal=True, tiles=(64, 32)),
    Case("n1000-d111-f32-causal-strided", 1, 2, 2, 1000, 1000, 111, F32, causal=True, strided=True),
    Case("n1023x1000-d128-bf16-softcap20-strided-mqa", 1, 2, 1, 1023, 1000, 128, BF16, softcap=20.0, strided=True),
    Case("n17x1023-d256-f32-mqa", 1, 4, 1, 17, 1023, 256, F32),
    Case("n1000x17-d64-bf16-causal-strided-emptyrows", 2, 2, 2, 1000, 17, 64, BF16, causal=True, strided=True),
    Case("n203-d40-f32-causal-softcap5-gqa2-t64x64", 1, 4, 2, 203, 203, 40, F32, causal=True, softcap=5.0,
         tiles=(64, 64)),
    Case("n1023-d80-bf16-causal-gqa2", 1, 4, 2, 1023, 1023, 80, BF16, causal=True),
    Case("n113-d256-bf16-causal-strided-t32x32", 1, 2, 2, 113, 113, 256, BF16, causal=True, strided=True,
         tiles=(32, 32)),
    Case("n1000x1023-d59-f32-causal-gqa2", 1, 4, 2, 1000, 1023, 59, F32, causal=True),
    Case("n17x203-d111-bf16-mqa-strided-t16x16", 2, 2, 1, 17, 203, 111, BF16, strided=True, tiles=(16, 16)),
    Case("n203x1000-d96-f32-causal-strided-t64x128", 1, 2, 2, 203, 1000, 96, F32, causal=True, strided=True,
         tiles=(64, 128)),
    Case("n113-d128-f16-causal-t48x40", 1, 2, 2, 113, 113, 128, F16, causal=True, tiles=(48, 40)),
    Case("n113x17-d64-dv40-f32-gqa2", 2, 4, 2, 113, 17, 64, F32, Dv=40),
    Case("n1023-d64-f32-b2h8-default-tiles", 2, 8, 8, 1023, 1023, 64, F32, causal=True),
)


@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_grid_against_oracle(case: Case) -> None:
    q, k, v = _inputs(case.B, case.Hq, case.Hkv, case.Nq, case.Nk, case.D, case.Dv or case.D, case.dtype,
                      case.strided, seed=zlib.crc32(case.id.encode()) % 1000)
    with _tiles(case.tiles):
        check_attention(q, k, v, backend="cpu", causal=case.causal, softcap=case.softcap)


# ----------------------------------------------------------------------------- patterns
def _mod5_or_sink(b, h, q, k):
    return ((q - k) % 5 == 0) | (k < 3)


def _head_band(b, h, q, k):
    return (q - k).abs() <= 4 * (h + 1)


def _layout(nq: int, nk: int, bs: int, seed: int) -> torch.Tensor:
    n = -(-nk // bs)
    lay = torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) < 0.35
    lay[1] = False                                   # a block row of queries with no key
    return lay


# name -> factory(nq, nk) -> Pattern, for the families that exist in memattn.patterns.
_FAMILIES: dict[str, Callable[[int, int], Pattern]] = {
    "causal": lambda nq, nk: P.causal(),
    "sliding_window_7": lambda nq, nk: P.sliding_window(7),
    "sliding_window_5_3": lambda nq, nk: P.sliding_window(5, 3),
    "sliding_window_per_head": lambda nq, nk: P.sliding_window((3, 40, 0, 17), (0, 2, 9, 0)),
    "and_window_band": lambda nq, nk: P.sliding_window(40, 40) & P.sliding_window(10, 0),
    "or_windows_per_head": lambda nq, nk: P.sliding_window(2) | P.sliding_window((0, 1, 2, 3), (5, 0, 0, 30)),
}
_OPTIONAL: dict[str, tuple[str, Callable[[int, int], Pattern]]] = {
    "dilated": ("dilated", lambda nq, nk: P.dilated(30, 3)),
    "dilated_right": ("dilated", lambda nq, nk: P.dilated(20, 2, right=9)),
    "strided": ("strided", lambda nq, nk: P.strided(7, 11, local=2)),
    "fixed": ("fixed", lambda nq, nk: P.fixed(16, summary=2)),
    "exponential": ("exponential", lambda nq, nk: P.exponential(local=3)),
    "random": ("random", lambda nq, nk: P.random(9, seed=1)),
    "global_tokens": ("global_tokens", lambda nq, nk: P.global_tokens([0, 5, 77])),
    "longformer": ("longformer", lambda nq, nk: P.longformer(8, [0, 50])),
    "bigbird": ("bigbird", lambda nq, nk: P.bigbird(block_size=16, window_blocks=3, global_blocks=2,
                                                    random_blocks=2, seed=3)),
    "document": ("document", lambda nq, nk: P.document([50, 1, 80, nk - 131])),
    "block_sparse": ("block_sparse", lambda nq, nk: P.block_sparse(_layout(nq, nk, 32, 5), 32)),
    "mask_mod": ("from_mask_mod", lambda nq, nk: P.from_mask_mod(_mod5_or_sink)),
    "mask_mod_per_head": ("from_mask_mod", lambda nq, nk: P.from_mask_mod(_head_band, num_heads=4)),
    "strided_and_window": ("strided", lambda nq, nk: P.strided(3) & P.sliding_window(60, 60)),
    "window_or_global": ("global_tokens", lambda nq, nk: P.sliding_window(5) | P.global_tokens([3, 150])),
    "longformer_and_causal_per_head": ("longformer",
                                       lambda nq, nk: P.longformer(10, [7]) & P.sliding_window((100, 5, 50, 0))),
}
for _name, (_attr, _fn) in _OPTIONAL.items():
    if hasattr(P, _attr):
        _FAMILIES[_name] = _fn
PATTERN_NAMES = tuple(_FAMILIES)


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_pattern_against_oracle_f32(name: str, causal: bool) -> None:
    nq = nk = 203
    q, k, v = _inputs(1, 4, 2, nq, nk, 40, 40, F32, False, seed=7)
    with cpu.tile_sizes(32, 16):
        check_attention(q, k, v, backend="cpu", pattern=_FAMILIES[name](nq, nk), causal=causal)


@pytest.mark.parametrize("tiles", [(16, 32), None], ids=["t16x32", "default"])
@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_pattern_exact_f64(name: str, tiles: tuple[int, int] | None) -> None:
    """float64, Nq != Nk, GQA 2:1: the cpu backend equals the reference to 1e-10."""
    nq, nk = 150, 203
    q, k, v = _inputs(2, 4, 2, nq, nk, 24, 16, F64, True, seed=11)
    dout = torch.randn(2, 4, nq, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    pat = _FAMILIES[name](nq, nk)
    with _tiles(tiles):
        got = run_attention(q, k, v, dout, backend="cpu", pattern=pat)
    want = run_attention(q, k, v, dout, backend="reference", pattern=pat)
    for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), n
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 if n != "lse" else 1e-6, msg=n)


@dataclass(frozen=True)
class _Spy(Pattern):
    """Delegates to ``inner`` and counts predicate calls and their tile shapes."""

    inner: Pattern
    calls: ClassVar[list[tuple[int, ...]]] = []

    @property
    def num_heads(self):  # type: ignore[override]
        return self.inner.num_heads

    def mask(self, b, h, q_pos, kv_pos):
        _Spy.calls.append(tuple(torch.broadcast_shapes(q_pos.shape, kv_pos.shape)))
        return self.inner.mask(b, h, q_pos, kv_pos)

    def _coo(self, nq, nk, block_q, block_k):
        return self.inner._coo(nq, nk, block_q, block_k)


@pytest.mark.parametrize("inner", [P.causal(), P.sliding_window(100, 7)], ids=["causal", "window"])
def test_predicate_only_on_partial_tiles(inner: Pattern) -> None:
    nq, nk, bq, bk = 300, 300, 32, 16
    spy = _Spy(inner)
    bm = spy.block_map(nq, nk, bq, bk)
    partial = int((~bm.full).sum())
    assert 0 < partial < bm.nnz
    # one head: however many worker threads split the blocks, each tile is visited once per pass
    q = torch.randn(1, 1, nq, 16, requires_grad=True)
    _Spy.calls.clear()
    with cpu.tile_sizes(bq, bk):
        out = cpu.attention(q, q, q, pattern=spy, scale=0.25)[0]
        assert len(_Spy.calls) == partial           # forward: once per partial tile, never on full ones
        out.sum().backward()
    assert len(_Spy.calls) == 2 * partial          # backward: the same tiles again
    assert all(s[-2] <= bq and s[-1] <= bk for s in _Spy.calls)


def test_per_head_map_with_gqa_sums_kv_gradients() -> None:
    """Per-head windows (Hm = Hq) with 2 query heads per kv head: dk/dv sum over both."""
    q, k, v = _inputs(2, 4, 2, 77, 90, 32, 32, F32, False, seed=5)
    with cpu.tile_sizes(16, 16):
        check_attention(q, k, v, backend="cpu", pattern=P.sliding_window((1, 30, 7, 0), (3, 0, 0, 12)))


# ------------------------------------------------------------------- special behaviours
@dataclass(frozen=True)
class _EveryThirdEmpty(Pattern):
    """Causal, except that every third query (by position) attends to nothing."""

    def mask(self, b, h, q_pos, kv_pos):
        return (q_pos % 3 != 0) & (kv_pos <= q_pos)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("pattern_id", ["every_third_empty", "causal_nq_gt_nk"])
def test_fully_masked_rows(dtype: torch.dtype, pattern_id: str) -> None:
    if pattern_id == "every_third_empty":
        nq, nk, pat, causal = 70, 70, _EveryThirdEmpty(), False
        empty = torch.arange(nq) % 3 == 0
    else:
        nq, nk, pat, causal = 70, 40, None, True
        empty = torch.arange(nq) < nq - nk
    q, k, v = _inputs(1, 4, 2, nq, nk, 32, 32, dtype, False, seed=2)
    with cpu.tile_sizes(16, 16):
        check_attention(q, k, v, backend="cpu", pattern=pat, causal=causal)
        out, lse, dq, dk, dv = run_attention(q, k, v, torch.ones(1, 4, nq, 32, dtype=dtype), backend="cpu",
                                             pattern=pat, causal=causal)
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


def test_queries_before_every_key() -> None:
    """Nq > Nk with causal ∩ window: queries 0..14 sit at negative positions (no key)."""
    q = torch.randn(1, 2, 20, 8, requires_grad=True)
    kv = torch.randn(1, 2, 5, 8)
    out, lse = memattn.attention(q, kv, kv, causal=True, pattern=P.sliding_window(2), backend="cpu",
                                 return_lse=True)
    assert torch.equal(out[:, :, :15], torch.zeros_like(out[:, :, :15]))
    assert torch.isneginf(lse[:, :, :15]).all() and torch.isfinite(lse[:, :, 15:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.equal(q.grad[:, :, :15], torch.zeros_like(q.grad[:, :, :15]))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_single_key(dtype: torch.dtype) -> None:
    """Nq = Nk = 1: out = v, lse = s. The softmax is constant, so dq and dk are zero in exact
    arithmetic; the FA2 form dS = P(dP - delta) leaves rounding noise there, whose bound is
    that of the dot products dout·v (a few ulps of |dout||v|), times |k| (|q|) and the scale."""
    q, k, v = _inputs(2, 4, 2, 1, 1, 64, 64, dtype, False, seed=21)
    dout = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_attention(q, k, v, backend="cpu", grads=False)
    out, lse, dq, dk, dv = run_attention(q, k, v, dout, backend="cpu")
    g = 2
    v_rep = v.repeat_interleave(g, 1).double()
    torch.testing.assert_close(out.double(), v_rep, rtol=0, atol=0)
    s = (q.double() * k.repeat_interleave(g, 1).double()).sum(-1) * 64 ** -0.5
    torch.testing.assert_close(lse.double(), s, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dv.double(), dout.double().unflatten(1, (2, g)).sum(2), rtol=1e-2, atol=1e-2)
    eps = torch.finfo(torch.float32).eps
    dp_err = 4 * eps * (dout.double().abs() * v_rep.abs()).sum(-1, keepdim=True)      # (B, Hq, 1, 1)
    assert (dq.double().abs() <= dp_err * k.repeat_interleave(g, 1).double().abs() * 64 ** -0.5 + 1e-30).all()
    dk_bound = (dp_err * q.double().abs()).unflatten(1, (2, g)).sum(2) * 64 ** -0.5
    assert (dk.double().abs() <= dk_bound + 1e-30).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_extreme_logits(dtype: torch.dtype) -> None:
    """Scores of order ±1e4 (softmax nearly one-hot): finite, and within the rule."""
    gen = torch.Generator().manual_seed(4)
    q = (torch.randn(1, 2, 100, 32, generator=gen) * 25).to(dtype)
    k = (torch.randn(1, 2, 130, 32, generator=gen) * 25).to(dtype)
    v = torch.randn(1, 2, 130, 32, generator=gen).to(dtype)
    s = (q.double() @ k.double().transpose(-1, -2)).abs().max()
    assert s > 1e4
    with cpu.tile_sizes(32, 32):
        out, lse, dq, dk, dv = run_attention(q, k, v, torch.randn(1, 2, 100, 32, generator=gen).to(dtype),
                                             backend="cpu", causal=True, scale=1.0)
        for t in (out, lse, dq, dk, dv):
            assert torch.isfinite(t).all()
        check_attention(q, k, v, backend="cpu", causal=True, scale=1.0)


@pytest.mark.parametrize("pattern", [None, P.sliding_window(20, 5)], ids=["dense", "window"])
def test_dropout_matches_reference(pattern: Pattern | None) -> None:
    """Same seed → the same dropped pairs in both backends (shared counter hash)."""
    q, k, v = _inputs(2, 4, 2, 91, 77, 16, 24, F64, True, seed=8)
    dout = torch.randn(2, 4, 91, 24, dtype=F64, generator=torch.Generator().manual_seed(1))
    kw = dict(pattern=pattern, causal=True, dropout_p=0.3, softcap=3.0)
    with cpu.tile_sizes(16, 32):
        got = run_attention(q, k, v, dout, backend="cpu", rng_seed=5, **kw)
    want = run_attention(q, k, v, dout, backend="reference", rng_seed=5, **kw)
    for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 if n != "lse" else 1e-6, msg=n)
    no_drop = run_attention(q, k, v, None, backend="cpu", pattern=pattern, causal=True, softcap=3.0)[0]
    assert (got[0] - no_drop).abs().max() > 1e-3          # dropout did drop something
    other = run_attention(q, k, v, None, backend="cpu", rng_seed=6, **kw)[0]
    assert (got[0] - other).abs().max() > 1e-3            # another seed, another mask


def test_dropout_f32_rule() -> None:
    q, k, v = _inputs(1, 4, 4, 150, 150, 64, 64, F32, False, seed=9)
    check_attention(q, k, v, backend="cpu", causal=True, dropout_p=0.2)


# ------------------------------------------------------------------- attention_backward
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_attention_backward_equals_autograd(dtype: torch.dtype) -> None:
    """attention_backward from (out, lse) gives autograd's gradients; the public lse is float32,
    so for float64 inputs it is also given an exact float64 lse to compare at 1e-12."""
    q, k, v = _inputs(2, 4, 2, 60, 75, 16, 16, dtype, True, seed=12)
    dout = torch.randn(2, 4, 60, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    pat = P.sliding_window(30, 4)
    with cpu.tile_sizes(16, 8):
        out, lse, *grads = run_attention(q, k, v, dout, backend="cpu", pattern=pat, softcap=2.0)
        manual = memattn.api.attention_backward(q, k, v, out.detach(), dout, lse, pattern=pat, softcap=2.0,
                                                backend="cpu")
        if dtype == F64:
            s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 16 ** -0.5
            s = 2.0 * torch.tanh(s / 2.0)
            s = s.masked_fill(~reference.dense_mask(pat, 2, 4, 60, 75, q.device), float("-inf"))
            lse64 = torch.logsumexp(s, -1)
            exact = cpu.attention_backward(q, k, v, out.detach(), dout, lse64, pattern=pat, scale=16 ** -0.5,
                                           softcap=2.0)
            for n, a, b in zip(("dq", "dk", "dv"), exact, grads):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=n)
    tol = 1e-6 if dtype == F64 else 2e-6        # the float32 lse rounds P by ~1e-7 relative
    for n, a, b in zip(("dq", "dk", "dv"), manual, grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=n)
    ref = memattn.api.attention_backward(q, k, v, out.detach(), dout, lse, pattern=pat, softcap=2.0,
                                         backend="reference")
    for n, a, b in zip(("dq", "dk", "dv"), manual, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=n)


def test_attention_backward_partial_kv_blocks_sum_to_whole() -> None:
    """Ring-attention use: gradients of two key halves, given the merged out/lse, add up."""
    q, k, v = _inputs(1, 2, 2, 40, 64, 16, 16, F64, False, seed=13)
    dout = torch.randn(1, 2, 40, 16, dtype=F64)
    out, lse = cpu.attention(q, k, v, pattern=None, scale=0.25)
    whole = cpu.attention_backward(q, k, v, out, dout, lse, pattern=None, scale=0.25)
    a = cpu.attention_backward(q, k[:, :, :30], v[:, :, :30], out, dout, lse, pattern=None, scale=0.25)
    b = cpu.attention_backward(q, k[:, :, 30:], v[:, :, 30:], out, dout, lse, pattern=None, scale=0.25)
    torch.testing.assert_close(a[0] + b[0], whole[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([a[1], b[1]], 2), whole[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([a[2], b[2]], 2), whole[2], rtol=0, atol=1e-12)


# ------------------------------------------------------------------ fuzz (float64, exact)
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

def _sized(name: str) -> Callable[[int, int, int], Pattern | None]:
    family = _FAMILIES[name]
    return lambda nq, nk, h: family(nq, nk)


_FUZZ_PATTERNS: tuple[Callable[[int, int, int], Pattern | None], ...] = (
    lambda nq, nk, h: None,
    lambda nq, nk, h: P.sliding_window(3, 2),
    lambda nq, nk, h: P.sliding_window(tuple(range(0, 2 * h, 2)), tuple(range(h))),
    lambda nq, nk, h: P.sliding_window(9) | P.sliding_window(0, 4),
    lambda nq, nk, h: _EveryThirdEmpty() & P.sliding_window(20, 20),
) + tuple(_sized(n) for n in ("strided", "random", "global_tokens", "exponential", "mask_mod") if n in _FAMILIES)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), g=st.integers(1, 3), nq=st.integers(1, 70),
       nk=st.integers(1, 70), D=st.integers(1, 24), Dv=st.integers(1, 20), causal=st.booleans(),
       softcap=st.sampled_from([0.0, 2.5]), pidx=st.integers(0, len(_FUZZ_PATTERNS) - 1),
       bq=st.integers(1, 40), bk=st.integers(1, 40), strided=st.booleans())
def test_fuzz_against_reference_f64(B, Hkv, g, nq, nk, D, Dv, causal, softcap, pidx, bq, bk, strided) -> None:
    Hq = Hkv * g
    q, k, v = _inputs(B, Hq, Hkv, nq, nk, D, Dv, F64, strided, seed=nq * 131 + nk)
    dout = torch.randn(B, Hq, nq, Dv, dtype=F64, generator=torch.Generator().manual_seed(0))
    pat = _FUZZ_PATTERNS[pidx](nq, nk, Hq)
    kw = dict(pattern=pat, causal=causal, softcap=softcap)
    with cpu.tile_sizes(bq, bk):
        got = run_attention(q, k, v, dout, backend="cpu", **kw)
    want = run_attention(q, k, v, dout, backend="reference", **kw)
    for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(a).any(), n
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 if n != "lse" else 1e-6, msg=n)


# ---------------------------------------------------------------------- memory contract
def test_saves_only_q_k_v_out_lse() -> None:
    q, k, v = _inputs(1, 2, 2, 300, 300, 16, 16, F32, False, seed=1)
    q.requires_grad_(True)
    out = memattn.attention(q, k, v, causal=True, backend="cpu")
    saved = out.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(1, 2, 300, 16)] * 4 + [(1, 2, 300)]
    assert max(t.numel() for t in saved) < 300 * 300


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, memattn
    torch.set_num_threads(1)
    N = int(sys.argv[1])
    q, k, v = (torch.randn(1, 1, N, 16, requires_grad=True) for _ in range(3))
    memattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=True, backend="cpu").sum().backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = memattn.attention(q, k, v, causal=True, backend="cpu")
    out.backward(torch.ones_like(out))
    print(json.dumps({"growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}))
""")


def test_peak_memory_is_linear_not_quadratic() -> None:
    """N = 16384, one head: an N×N float32 array would be 1 GiB; the peak must stay tiny."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, "16384"], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    growth_mib = json.loads(res.stdout.strip().splitlines()[-1])["growth_kib"] / 1024
    # O(N) tensors: out + 3 grads + dout = 5 · 16384 · 16 · 4 B = 5 MiB; tiles ~ 2 MiB each
    assert growth_mib < 64, growth_mib


def test_poisoned_outputs_fail_the_rule() -> None:
    """With MEMATTN_POISON=1 (conftest) outputs start as NaN; an unwritten row fails."""
    assert os.environ.get("MEMATTN_POISON") == "1"
    t = cpu._new_output((2, 3), F32, torch.device("cpu"))
    assert torch.isnan(t).all()
    ref = torch.zeros(4, 5)
    bad = ref.clone()
    bad[2] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        check_close(bad, ref, ref)


def test_unwritten_row_block_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mutant forward that skips the last query block must fail check_attention."""
    orig = cpu._Rows.__init__

    def drop_last_row(self, bmap, head, n_rows, n_cols):
        orig(self, bmap, head, n_rows, n_cols)
        if n_rows > 1:
            self.rows = self.rows[:-1] + [[]]

    monkeypatch.setattr(cpu._Rows, "__init__", drop_last_row)
    q, k, v = _inputs(1, 2, 2, 40, 40, 8, 8, F32, False, seed=3)
    with cpu.tile_sizes(16, 16), pytest.raises(AssertionError):
        check_attention(q, k, v, backend="cpu")


def test_tile_sizes_validation() -> None:
    with pytest.raises(ValueError, match="block_q"):
        with cpu.tile_sizes(0, 16):
            pass
    with pytest.raises(ValueError, match="block_k"):
        with cpu.tile_sizes(16, 2.5):  # type: ignore[arg-type]
            pass


def test_large_batch_heads_chunking() -> None:
    """B·H beyond one chunk: several (batch, head) sub-problems, still exact."""
    q, k, v = _inputs(5, 48, 16, 40, 33, 8, 8, F64, False, seed=4)
    dout = torch.randn(5, 48, 40, 8, dtype=F64)
    got = run_attention(q, k, v, dout, backend="cpu", causal=True)
    want = run_attention(q, k, v, dout, backend="reference", causal=True)
    assert len(cpu._chunks(5, 16, 3)) > 1
    for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 if n != "lse" else 1e-6, msg=n)


# ------------------------------------------------------------------------ worker threads
@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("layout", ["one-head-split-blocks", "heads-over-workers", "per-head-gqa", "batch-gqa"])
def test_worker_threads_exact(workers: int, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The work split over threads (by sub-problem, or by query/key blocks with private dQ
    buffers when there are fewer sub-problems than workers) gives the reference's result."""
    monkeypatch.setattr(cpu, "_INLINE_ELEMS", 0)            # threads even for this small call
    B, Hq, Hkv, pat = {"one-head-split-blocks": (1, 1, 1, P.causal()), "heads-over-workers": (1, 5, 5, None),
                       "per-head-gqa": (1, 4, 2, P.sliding_window((3, 30, 0, 9), (2, 0, 5, 0))),
                       "batch-gqa": (3, 6, 2, P.sliding_window(17, 4))}[layout]
    q, k, v = _inputs(B, Hq, Hkv, 97, 120, 16, 12, F64, True, seed=31)
    dout = torch.randn(B, Hq, 97, 12, dtype=F64, generator=torch.Generator().manual_seed(4))
    prev = torch.get_num_threads()
    torch.set_num_threads(workers)
    try:
        with cpu.tile_sizes(16, 16):
            got = run_attention(q, k, v, dout, backend="cpu", pattern=pat, dropout_p=0.2, rng_seed=3)
        assert torch.get_num_threads() == workers           # the caller's setting is left alone
    finally:
        torch.set_num_threads(prev)
    want = run_attention(q, k, v, dout, backend="reference", pattern=pat, dropout_p=0.2, rng_seed=3)
    for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 if n != "lse" else 1e-6, msg=n)


def test_worker_threads_restore_the_default_for_new_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(cpu, "_INLINE_ELEMS", 0)

    q = torch.randn(1, 4, 64, 8, requires_grad=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(20):           # a restore race showed only now and then: repeat it
            memattn.attention(q, q, q, causal=True, backend="cpu").sum().backward()
            seen = []
            t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            t.start()
            t.join()
            assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_split_ranges_and_assign() -> None:
    assert cpu._split_ranges([1, 2, 3, 4], 1) == [(0, 4)]
    r = cpu._split_ranges(list(range(1, 33)), 2)            # causal row costs
    assert r[0][0] == 0 and r[-1][1] == 32 and len(r) == 2 and r[0][1] == r[1][0]
    costs = list(range(1, 33))
    assert abs(sum(costs[r[0][0]:r[0][1]]) - sum(costs[r[1][0]:r[1][1]])) <= 32
    units = cpu._assign([(5.0, "a"), (4.0, "b"), (3.0, "c"), (3.0, "d")], 2)  # type: ignore[list-item]
    assert sorted(map(sorted, units)) == [["a", "d"], ["b", "c"]]


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_runs_under_inference_mode_and_no_grad(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker threads take the caller's inference mode (outputs are inference tensors there)."""
    monkeypatch.setattr(cpu, "_INLINE_ELEMS", 0)
    q, k, v = _inputs(1, 4, 2, 50, 60, 8, 8, F32, False, seed=1)
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ctx:
            out = memattn.attention(q, k, v, causal=True, backend="cpu")
    finally:
        torch.set_num_threads(prev)
    want = memattn.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused() -> None:
    q = torch.randn(1, 2, 10, 4, dtype=F64, requires_grad=True)
    out = memattn.attention(q, q, q, backend="cpu")
    (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
