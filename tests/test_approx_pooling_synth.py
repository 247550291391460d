"""Attention pooling and the Synthesizer's softmax(S)·v against float64 loop references."""

from __future__ import annotations

import pytest
import torch

from memattn.approx import AdaptiveAvgPool, AvgPool, ConvPool, MaxPool, pooled_attention, synthesizer_attention

TOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def grads_match(out, ref, inputs):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, g)
    return [rel_err(a, b) for a, b in zip(got, want)]


# ------------------------------------------------------------------ reference pooling, by loops
def windows64(kind, n, stride, target, causal=False):
    if kind == "adaptive":
        L = min(target, n)
        return [((p * n) // L, -((-(p + 1) * n) // L)) for p in range(L)]
    if causal:   # complete windows only: a trailing partial window stays raw
        return [(s, s + stride) for s in range(0, n - stride + 1, stride)]
    return [(s, min(s + stride, n)) for s in range(0, n, stride)]


def pool_row(kind, x, valid, a, b, conv=None):
    """x (B, H, n, d) float64, valid (B, n) bool -> (B, H, d) for window [a, b)."""
    seg, w = x[:, :, a:b], valid[:, None, a:b, None].double()
    if kind in ("avg", "adaptive"):
        return (seg * w).sum(2) / w.sum(2).clamp_min(1.0)
    if kind == "max":
        m = seg.masked_fill(w == 0, float("-inf")).amax(2)
        return torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    weight, bias = conv
    out = sum(seg[:, :, i] * w[:, :, i] * weight[:, i].double() for i in range(b - a))
    return out + bias.double()


def pooled_ref(q, k, v, kind, stride, *, causal=False, pool_queries=False, target=64, key_mask=None,
               convs=None):
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    km = torch.ones(B, Nk, dtype=torch.bool) if key_mask is None else key_mask
    wins = windows64(kind, Nk, stride, target, causal)
    ck, cv = (None, None) if convs is None else convs
    if wins:
        kp = torch.stack([pool_row(kind, k, km, a, b, ck) for a, b in wins], 2)
        vp = torch.stack([pool_row(kind, v, km, a, b, cv) for a, b in wins], 2)
        pvalid = torch.stack([km[:, a:b].any(1) for a, b in wins], 1)        # (B, P)
    else:
        kp, vp, pvalid = k[:, :, :0], v[:, :, :0], km[:, :0]
    if pool_queries:
        qw = windows64(kind, Nq, stride, target)
        q = torch.stack([pool_row(kind, q, torch.ones(B, Nq, dtype=torch.bool), a, b, ck) for a, b in qw], 2)
    scale = D ** -0.5
    rows = []
    for i in range(q.shape[2]):
        t = i + Nk - Nq
        keys, vals, ok = [kp], [vp], [pvalid.clone()]
        if causal:
            vis = torch.tensor([b - 1 <= t for a, b in wins])
            ok[0] = ok[0] & vis
            last = max([b for a, b in wins if b - 1 <= t], default=0)
            loc = list(range(last, t + 1))
            if loc:
                keys.append(k[:, :, loc])
                vals.append(v[:, :, loc])
                ok.append(km[:, loc])
        kk, vv, okk = torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(ok, 1)
        s = (q[:, :, i, None] * kk).sum(-1) * scale                        # (B, H, keys)
        s = s.masked_fill(~okk[:, None], float("-inf"))
        p = torch.softmax(s, -1)
        p = torch.nan_to_num(p, nan=0.0)
        rows.append((p[..., None] * vv).sum(2))
    return torch.stack(rows, 2)


def qkv(B, Hq, Hkv, Nq, Nk, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=gen).requires_grad_(),
            torch.randn(B, Hkv, Nk, D, generator=gen).requires_grad_(),
            torch.randn(B, Hkv, Nk, D, generator=gen).requires_grad_())


# (id, kind, stride, target, B, Hq, Hkv, Nq, Nk, D)
POOL = (
    ("avg_s2", "avg", 2, None, 2, 2, 2, 21, 21, 8),
    ("avg_s5_gqa", "avg", 5, None, 1, 4, 2, 23, 23, 8),
    ("max_s3", "max", 3, None, 2, 2, 2, 20, 20, 8),
    ("adaptive_7", "adaptive", 2, 7, 1, 2, 2, 25, 25, 8),
    ("avg_nq_lt_nk", "avg", 4, None, 1, 2, 1, 9, 26, 8),
)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("case", POOL, ids=[c[0] for c in POOL])
def test_pooled_matches_float64_reference(case, causal):
    _, kind, stride, target, B, Hq, Hkv, Nq, Nk, D = case
    if causal and kind == "adaptive":
        q, k, v = qkv(1, 1, 1, 8, 8, 4)
        with pytest.raises(ValueError, match="adaptive"):
            pooled_attention(q, k, v, pool="adaptive", causal=True)
        return
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    km = torch.ones(B, Nk, dtype=torch.bool)
    km[-1, Nk - 4:] = False
    out = pooled_attention(q, k, v, pool=kind, stride=stride, target_len=target, causal=causal, key_padding_mask=km)
    ref = pooled_ref(q, k, v, kind, stride, causal=causal, target=target or 64, key_mask=km)
    assert out.shape == (B, Hq, Nq, D)
    assert rel_err(out, ref) <= TOL
    assert max(grads_match(out, ref, (q, k, v))) <= TOL


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_conv_pool_matches_reference_including_weight_grads(causal):
    q, k, v = qkv(2, 2, 2, 19, 19, 6, seed=2)
    gen = torch.Generator().manual_seed(3)
    wk, wv = torch.randn(6, 3, generator=gen).requires_grad_(), torch.randn(6, 3, generator=gen).requires_grad_()
    bk, bv = torch.randn(6, generator=gen).requires_grad_(), torch.randn(6, generator=gen).requires_grad_()
    out = pooled_attention(q, k, v, pool=ConvPool(wk, bk), pool_v=ConvPool(wv, bv), causal=causal)
    ref = pooled_ref(q, k, v, "conv", 3, causal=causal, convs=((wk, bk), (wv, bv)))
    assert rel_err(out, ref) <= TOL
    if causal:
        assert max(grads_match(out, ref, (q, k, v, wk, bk, wv, bv))) <= TOL
    else:
        # a bias shared by every pooled key shifts a query's scores by a constant: its
        # gradient is exactly 0 (softmax is shift-invariant), so only rounding noise remains
        (gb,) = torch.autograd.grad(out.sum(), (bk,), retain_graph=True)
        assert max(grads_match(out, ref, (q, k, v, wk, wv, bv))) <= TOL
        assert gb.abs().max() < 1e-5


@pytest.mark.parametrize("kind", ("avg", "max", "adaptive"))
def test_pooled_queries_funnel(kind):
    q, k, v = qkv(1, 2, 2, 22, 22, 8, seed=4)
    out = pooled_attention(q, k, v, pool=kind, stride=4, target_len=5, pool_queries=True)
    ref = pooled_ref(q, k, v, kind, 4, pool_queries=True, target=5)
    assert out.shape == ref.shape == (1, 2, 6 if kind != "adaptive" else 5, 8)
    assert rel_err(out, ref) <= TOL
    assert max(grads_match(out, ref, (q, k, v))) <= TOL


@pytest.mark.parametrize("kind", ("avg", "max"))
def test_causal_pooling_never_sees_the_future(kind):
    """Changing keys/values at positions > t leaves query t's output unchanged."""
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 30, 30, 8, seed=5))
    base = pooled_attention(q, k, v, pool=kind, stride=4, target_len=7, causal=True)
    for t in (0, 3, 4, 13, 28):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1:] += 5.0
        v2[:, :, t + 1:] -= 3.0
        out = pooled_attention(q, k2, v2, pool=kind, stride=4, target_len=7, causal=True)
        assert torch.allclose(out[:, :, : t + 1], base[:, :, : t + 1], atol=1e-6)
        if t < 28:
            assert not torch.allclose(out[:, :, t + 1:], base[:, :, t + 1:], atol=1e-3)


@pytest.mark.parametrize("kind", ("avg", "max"))
@pytest.mark.parametrize("n", (1, 3, 4, 9, 13), ids=lambda n: f"n{n}")
def test_causal_pooling_prefix_property(kind, n):
    """The causal output of a prefix equals the first rows of the whole sequence's output
    (a trailing partial window is not pooled), which is what decoding relies on."""
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 13, 13, 8, seed=6))
    full = pooled_attention(q, k, v, pool=kind, stride=4, causal=True)
    part = pooled_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], pool=kind, stride=4, causal=True)
    assert torch.allclose(part, full[:, :, :n], atol=1e-6)
    last = pooled_attention(q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], pool=kind, stride=4, causal=True)
    assert torch.allclose(last, full[:, :, n - 1:n], atol=1e-6)


def test_poolers_directly():
    x = torch.arange(7.0)[None, :, None]
    assert AvgPool(3)(x)[0].flatten().tolist() == [1.0, 4.0, 6.0]
    assert MaxPool(3)(x)[0].flatten().tolist() == [2.0, 5.0, 6.0]
    assert AdaptiveAvgPool(3)(x)[0].flatten().tolist() == [1.0, 3.0, 5.0]
    valid = torch.tensor([[True, True, False, False, False, False, False]])
    pooled, pvalid = MaxPool(3)(x, valid)
    assert pooled.flatten().tolist() == [1.0, 0.0, 0.0] and pvalid.tolist() == [[True, False, False]]
    assert AvgPool(2) == AvgPool(2) and hash(MaxPool(3)) == hash(MaxPool(3))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    (
        (dict(pool="median"), ValueError, "pool"),
        (dict(pool=3), TypeError, "pool"),
        (dict(stride=0), ValueError, "stride"),
        (dict(causal=True, pool_queries=True), ValueError, "pool_queries"),
        (dict(pool="adaptive", target_len=0), ValueError, "target_len"),
    ),
    ids=("name", "type", "stride", "causal_funnel", "target_len"),
)
def test_pooled_validation(kwargs, exc, match):
    q, k, v = qkv(1, 1, 1, 8, 8, 4)
    with pytest.raises(exc, match=match):
        pooled_attention(q, k, v, **kwargs)


# ------------------------------------------------------------------ synthesizer
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_synthesizer_softmax_matches_float64(causal):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(1, 4, 11, 15, generator=gen).requires_grad_()
    v = torch.randn(2, 2, 15, 6, generator=gen).requires_grad_()
    km = torch.ones(2, 15, dtype=torch.bool)
    km[1, 12:] = False
    out = synthesizer_attention(s, v, causal=causal, key_padding_mask=km)
    allowed = km[:, None, None, :].clone().expand(2, 4, 11, 15)
    if causal:
        allowed = allowed & (torch.arange(15)[None, :] <= torch.arange(11)[:, None] + 4)
    p = torch.softmax(s.double().masked_fill(~allowed, float("-inf")), -1)
    ref = p @ v.double().repeat_interleave(2, 1)
    assert rel_err(out, ref) <= TOL
    assert max(grads_match(out, ref, (s, v))) <= TOL


def test_synthesizer_validation():
    with pytest.raises(ValueError, match="keys"):
        synthesizer_attention(torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 3))
    with pytest.raises(ValueError, match="multiple"):
        synthesizer_attention(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 3))
