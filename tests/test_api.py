"""The public contract of memattn.attention / attention_backward (design.md §3)."""

from __future__ import annotations

import pytest
import torch

import memattn
from memattn import patterns as P
from memattn.api import attention_backward

F64 = torch.float64


def _qkv(B=1, Hq=2, Hkv=2, Nq=9, Nk=9, D=8, Dv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=gen).to(dtype), torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype),
            torch.randn(B, Hkv, Nk, Dv or D, generator=gen).to(dtype))


# ------------------------------------------------------------------------- bad input
def _bad(name):
    q, k, v = _qkv()
    cases = {
        "q-rank3": ((q[0], k, v), {}, ValueError, "q must have rank 4"),
        "k-rank5": ((q, k[None], v), {}, ValueError, "k must have rank 4"),
        "v-rank2": ((q, k, v[0, 0]), {}, ValueError, "v must have rank 4"),
        "q-not-tensor": ((q.tolist(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        "int-dtype": ((q.long(), k.long(), v.long()), {}, TypeError, "q has dtype"),
        "dtype-mismatch": ((q, k.double(), v), {}, TypeError, "share a dtype"),
        "device-mismatch": ((q, k.to("meta"), v), {}, ValueError, "one device"),
        "batch-mismatch": ((q, torch.cat([k, k]), torch.cat([v, v])), {}, ValueError, "batch"),
        "head-dim-mismatch": ((q, k[..., :4], v), {}, ValueError, "head dim"),
        "v-length-mismatch": ((q, k, v[:, :, :5]), {}, ValueError, "v must have k's heads and length"),
        "gqa-not-multiple": ((torch.randn(1, 3, 9, 8), k, v), {}, ValueError, "multiple of k's heads"),
        "scale-zero": ((q, k, v), {"scale": 0.0}, ValueError, "scale"),
        "scale-negative": ((q, k, v), {"scale": -1.0}, ValueError, "scale"),
        "scale-string": ((q, k, v), {"scale": "1"}, ValueError, "scale"),
        "scale-nan": ((q, k, v), {"scale": float("nan")}, ValueError, "scale"),
        "softcap-negative": ((q, k, v), {"softcap": -1.0}, ValueError, "softcap"),
        "dropout-one": ((q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        "dropout-negative": ((q, k, v), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        "backend-unknown": ((q, k, v), {"backend": "cuda"}, ValueError, "backend"),
        "backend-not-str": ((q, k, v), {"backend": None}, ValueError, "backend"),
        "pattern-string": ((q, k, v), {"pattern": "causal"}, TypeError, "pattern"),
        "pattern-tensor": ((q, k, v), {"pattern": torch.ones(9, 9, dtype=torch.bool)}, TypeError, "pattern"),
        "causal-not-bool": ((q, k, v), {"causal": 1}, TypeError, "causal"),
        "pattern-heads-mismatch": ((q, k, v), {"pattern": P.sliding_window((1, 2, 3))}, ValueError, "heads"),
        "empty-length": ((q[:, :, :0], k, v), {}, ValueError, "empty"),
    }
    return cases[name]


BAD_INPUTS = ("q-rank3", "k-rank5", "v-rank2", "q-not-tensor", "int-dtype", "dtype-mismatch", "device-mismatch",
              "batch-mismatch", "head-dim-mismatch", "v-length-mismatch", "gqa-not-multiple", "scale-zero",
              "scale-negative", "scale-string", "scale-nan", "softcap-negative", "dropout-one", "dropout-negative",
              "backend-unknown", "backend-not-str", "pattern-string", "pattern-tensor", "causal-not-bool",
              "pattern-heads-mismatch", "empty-length")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(name: str, backend: str) -> None:
    args, kwargs, exc, match = _bad(name)
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(exc, match=match):
        memattn.attention(*args, **kwargs)


def test_attention_backward_validates_shapes() -> None:
    q, k, v = _qkv()
    out, lse = memattn.attention(q, k, v, return_lse=True, backend="cpu")
    with pytest.raises(ValueError, match="out and dout"):
        attention_backward(q, k, v, out[:, :, :3], out, lse, backend="cpu")
    with pytest.raises(ValueError, match="lse"):
        attention_backward(q, k, v, out, out, lse[:, :1], backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        attention_backward(q, k, v, out, out, lse, backend="nope")


# ----------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["f16", "bf16", "f32", "f64"])
def test_dtypes_and_shapes(dtype: torch.dtype) -> None:
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, Nq=7, Nk=11, D=8, Dv=5, dtype=dtype)
    out = memattn.attention(q, k, v, backend="cpu")
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (2, 4, 7, 5)
    out2, lse = memattn.attention(q, k, v, backend="cpu", return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 7)
    assert torch.equal(out, out2)


def test_auto_is_cpu_on_cpu_tensors() -> None:
    q, k, v = _qkv(seed=1)
    assert torch.equal(memattn.attention(q, k, v, causal=True), memattn.attention(q, k, v, causal=True,
                                                                                   backend="cpu"))


def test_default_scale_is_inverse_sqrt_head_dim() -> None:
    q, k, v = _qkv(D=16, dtype=F64)
    a = memattn.attention(q, k, v, backend="cpu")
    b = memattn.attention(q, k, v, backend="cpu", scale=0.25)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    c = memattn.attention(q, k, v, backend="cpu", scale=0.5)
    assert (a - c).abs().max() > 1e-3


def test_causal_and_pattern_mean_intersection() -> None:
    q, k, v = _qkv(Nq=20, Nk=30, dtype=F64)
    w = P.sliding_window(4, 6)
    a = memattn.attention(q, k, v, pattern=w, causal=True, backend="cpu")
    b = memattn.attention(q, k, v, pattern=w & P.causal(), backend="cpu")
    c = memattn.attention(q, k, v, pattern=P.sliding_window(4, 0), backend="cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-14)


@pytest.mark.parametrize("nq,nk", [(9, 9), (4, 9), (9, 4)], ids=["square", "nq<nk", "nq>nk"])
def test_bottom_right_alignment(nq: int, nk: int) -> None:
    """causal: key j is allowed for query i iff j <= i + nk - nq (flash_attn convention)."""
    q, k, v = _qkv(Nq=nq, Nk=nk, dtype=F64)
    out, lse = memattn.attention(q, k, v, causal=True, backend="cpu", return_lse=True)
    s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    allowed = torch.arange(nk)[None, :] <= (torch.arange(nq) + nk - nq)[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    want_lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    torch.testing.assert_close(out, p @ v, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, want_lse.float(), rtol=0, atol=1e-6)


def test_matches_sdpa_causal_gqa_f64() -> None:
    q, k, v = _qkv(B=2, Hq=6, Hkv=2, Nq=33, Nk=33, D=16, dtype=F64, seed=3)
    out = memattn.attention(q, k, v, causal=True, backend="cpu")
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                            is_causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_gradcheck_cpu_backend_f64() -> None:
    """Numerical gradients of the whole api path: GQA, Nq != Nk, causal ∩ window, softcap."""
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Nq=5, Nk=7, D=3, Dv=2, dtype=F64, seed=4)
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    def f(q, k, v):
        from memattn.backends import cpu
        with cpu.tile_sizes(2, 3):
            return memattn.attention(q, k, v, causal=True, pattern=P.sliding_window(3, 1), softcap=1.5,
                                     backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_dropout_draws_a_new_mask_per_call_and_follows_torch_seed() -> None:
    q, k, v = _qkv(Nq=30, Nk=30, seed=5)
    torch.manual_seed(0)
    a = memattn.attention(q, k, v, dropout_p=0.5, backend="cpu")
    b = memattn.attention(q, k, v, dropout_p=0.5, backend="cpu")
    torch.manual_seed(0)
    c = memattn.attention(q, k, v, dropout_p=0.5, backend="cpu")
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_attention_backward_api(backend: str) -> None:
    q, k, v = _qkv(B=1, Hq=4, Hkv=2, Nq=12, Nk=15, D=8, dtype=F64, seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = memattn.attention(*leaves, causal=True, return_lse=True, backend=backend)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, dout)
    got = attention_backward(q, k, v, out.detach(), dout, lse, causal=True, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)   # the float32 lse limits the match
    # accumulate_into: the gradients are added to the given tensors, which are returned
    accs = tuple(torch.randn_like(t) for t in (q, k, v))
    before = [a.clone() for a in accs]
    res = attention_backward(q, k, v, out.detach(), dout, lse, causal=True, backend=backend, accumulate_into=accs)
    assert all(r is a for r, a in zip(res, accs))
    for a, b0, g in zip(accs, before, got):
        torch.testing.assert_close(a, b0 + g, rtol=0, atol=1e-12)


def test_attention_backward_accumulate_into_is_checked() -> None:
    q, k, v = _qkv()
    out, lse = memattn.attention(q, k, v, return_lse=True, backend="cpu")
    with pytest.raises(TypeError, match="accumulate_into must be a tuple"):
        attention_backward(q, k, v, out, out, lse, backend="cpu", accumulate_into=[q])
    with pytest.raises(ValueError, match="accumulate_into's dv must be"):
        attention_backward(q, k, v, out, out, lse, backend="cpu",
                           accumulate_into=(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(q[:, :, :1])))
    with pytest.raises(TypeError, match="accumulate_into's dk must be a torch.Tensor"):
        attention_backward(q, k, v, out, out, lse, backend="cpu", accumulate_into=(torch.zeros_like(q), None, v))
    with pytest.raises(ValueError, match="accumulate_into's dq shares memory with q"):
        attention_backward(q, k, v, out, out, lse, backend="cpu",
                           accumulate_into=(q, torch.zeros_like(k), torch.zeros_like(v)))
