"""The oracle itself (backends/reference.py), the dropout hash, and the error-rule helpers."""

from __future__ import annotations

import pytest
import torch

import memattn
from memattn import patterns as P
from memattn._dropout import keep_mask
from memattn.backends import reference

from _errors import check_attention, check_close, rounding_atol

F64 = torch.float64


def _qkv(B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=gen, dtype=F64).to(dtype),
            torch.randn(B, Hkv, Nk, D, generator=gen, dtype=F64).to(dtype),
            torch.randn(B, Hkv, Nk, Dv or D, generator=gen, dtype=F64).to(dtype))


def _naive(q, k, v, allowed, scale, softcap=0.0):
    """Loop over heads; softmax over the allowed keys; zero rows where none is allowed."""
    B, Hq, Nq, _ = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=F64)
    lse = torch.full((B, Hq, Nq), float("-inf"), dtype=F64)
    for b in range(B):
        for h in range(Hq):
            s = (q[b, h] @ k[b, h // g].T) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            for i in range(Nq):
                keys = allowed[i].nonzero().flatten()
                if keys.numel():
                    w = torch.softmax(s[i, keys], 0)
                    out[b, h, i] = w @ v[b, h // g, keys]
                    lse[b, h, i] = torch.logsumexp(s[i, keys], 0)
    return out, lse


@pytest.mark.parametrize("pattern,causal,softcap", [
    (None, False, 0.0), (None, True, 0.0), (P.sliding_window(3, 2), False, 2.0), (P.sliding_window(1), True, 0.0),
], ids=["dense", "causal", "window-softcap", "window-causal"])
def test_reference_matches_naive_loops(pattern, causal, softcap) -> None:
    q, k, v = _qkv(2, 4, 2, 9, 13, 5, 3)
    out, lse = memattn.attention(q, k, v, pattern=pattern, causal=causal, softcap=softcap, backend="reference",
                                 return_lse=True)
    pat = pattern if not causal else (P.causal() if pattern is None else pattern & P.causal())
    allowed = pat.dense(9, 13) if pat is not None else torch.ones(9, 13, dtype=torch.bool)
    want_out, want_lse = _naive(q, k, v, allowed, 5 ** -0.5, softcap)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse.float(), rtol=0, atol=1e-6)


def test_reference_matches_sdpa_with_mask() -> None:
    q, k, v = _qkv(1, 2, 2, 16, 16, 8)
    pat = P.sliding_window(5, 2)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=pat.dense(16, 16))
    got = memattn.attention(q, k, v, pattern=pat, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_reference_fully_masked_rows() -> None:
    q, k, v = _qkv(1, 2, 2, 10, 4, 8)
    q.requires_grad_()
    out, lse = memattn.attention(q, k, v, causal=True, backend="reference", return_lse=True)
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    assert torch.isneginf(lse[:, :, :6]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :6], torch.zeros_like(q.grad[:, :, :6]))


def test_reference_dropout_is_the_shared_hash() -> None:
    q, k, v = _qkv(2, 2, 1, 6, 7, 4)
    seed, p = 1234, 0.4
    out, _ = reference.attention(q, k, v, pattern=None, scale=0.5, dropout_p=p, dropout_seed=seed)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    w = torch.softmax(s, -1)
    bh = torch.arange(2).view(2, 1, 1, 1) * 2 + torch.arange(2).view(1, 2, 1, 1)
    keep = keep_mask(seed, bh, torch.arange(6).view(1, 1, 6, 1), torch.arange(7).view(1, 1, 1, 7), p)
    want = (w * keep / (1 - p)) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_keep_mask_is_deterministic_and_has_rate_p() -> None:
    bh = torch.arange(4).view(4, 1, 1)
    qi, ki = torch.arange(256).view(1, 256, 1), torch.arange(256).view(1, 1, 256)
    a = keep_mask(7, bh, qi, ki, 0.3)
    assert torch.equal(a, keep_mask(7, bh, qi, ki, 0.3))
    assert not torch.equal(a, keep_mask(8, bh, qi, ki, 0.3))
    assert abs(a.double().mean().item() - 0.7) < 0.005
    # tile order does not matter: a sub-block equals the same pairs computed alone
    assert torch.equal(a[:, 100:140, 30:90], keep_mask(7, bh, qi[:, 100:140], ki[:, :, 30:90], 0.3))


@pytest.mark.parametrize("pattern,softcap,nq,nk", [
    (None, 0.0, 11, 11), (P.sliding_window(2, 3), 1.5, 9, 14), (P.causal(), 0.0, 12, 5),
], ids=["dense", "window-softcap", "causal-emptyrows"])
def test_reference_attention_backward_equals_autograd(pattern, softcap, nq, nk) -> None:
    q, k, v = _qkv(2, 4, 2, nq, nk, 6, 5, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = reference.attention(*leaves, pattern=pattern, scale=0.4, softcap=softcap)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, dout)
    # the float64 lse (the public one is float32) so the closed form can match to 1e-12
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.4
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    m = reference.dense_mask(pattern, 2, 4, nq, nk, q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, -1)
    got = reference.attention_backward(q, k, v, out.detach(), dout, lse, pattern=pattern, scale=0.4, softcap=softcap)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ the error rule
def test_rounding_atol() -> None:
    assert rounding_atol(torch.zeros(5)) == 0.0
    x = torch.full((4,), 0.01, dtype=torch.bfloat16)
    assert rounding_atol(x) > 1e-4                   # bfloat16 granularity near 0.3
    assert rounding_atol(torch.full((4,), 0.01, dtype=F64)) < 1e-15
    assert rounding_atol(torch.tensor([float("-inf"), 0.01])) > 0   # infinities ignored


def test_check_close_passes_and_fails() -> None:
    oracle = torch.linspace(-1, 1, 101, dtype=F64)
    ref = oracle + 1e-3
    check_close(oracle + 2e-3, ref, oracle)                      # 2x the reference error: allowed
    with pytest.raises(AssertionError, match="max error"):
        check_close(oracle + 3e-3, ref, oracle)                  # 3x: not allowed for outputs
    check_close(oracle + 3e-3, ref, oracle, mult=3.0)            # allowed for gradients
    bad = oracle.clone()
    bad[7] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        check_close(bad, ref, oracle)
    lse = torch.tensor([float("-inf"), 1.0], dtype=F64)
    check_close(lse, lse, lse, name="lse")
    with pytest.raises(AssertionError, match="inf"):
        check_close(torch.tensor([0.0, 1.0]), lse, lse, name="lse")
    with pytest.raises(AssertionError, match="shapes"):
        check_close(oracle[:5], ref, oracle)


def test_check_attention_on_the_reference_itself() -> None:
    """The reference against itself meets the rule with equality (err = ref err)."""
    q, k, v = _qkv(1, 2, 1, 30, 40, 16, dtype=torch.bfloat16)
    report = check_attention(q, k, v, backend="reference", causal=True)
    assert set(report) == {"out", "lse", "dq", "dk", "dv"}
    assert report["out"]["err"] == report["out"]["ref_err"] > 0
