"""Kernel linear attention against float64 formula references (explicit masked O(N²) sums
and a step-by-step recurrence), outputs and all gradients, causal and not."""

from __future__ import annotations

import pytest
import torch

from memattn.approx import FEATURE_MAPS, EluPlusOne, FavorPositive, Relu, favor_projection, linear_attention
from memattn.approx.feature_maps import resolve_feature_map

TOL = 1e-5  # relative error (max |err| / max |ref|), float32 on the CPU vs the float64 formula


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


# ------------------------------------------------------------------ float64 references
def phi_elu(x, is_query):
    return torch.where(x > 0, x + 1.0, torch.exp(x))


def phi_relu(x, is_query):
    return torch.clamp(x, min=0.0)


def naive_linear(q, k, v, phi, *, causal, eps, key_mask=None):
    """Explicit masked sum: out_i = Σ_j w_ij v_j / (Σ_j w_ij + eps), w_ij = φ(q_i)·φ(k_j)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    Nq, Nk = q.shape[2], k.shape[2]
    pk = phi(k, False)
    if key_mask is not None:
        pk = pk * key_mask[:, None, :, None].double()
    w = torch.einsum("bhif,bhjf->bhij", phi(q, True), pk)
    if causal:
        allowed = torch.arange(Nk)[None, :] <= (torch.arange(Nq)[:, None] + Nk - Nq)
        w = w * allowed
    return torch.einsum("bhij,bhjd->bhid", w, v) / (w.sum(-1, keepdim=True) + eps)


def recurrent_linear(q, k, v, phi, *, eps):
    """Step by step: S_t = S_{t-1} + φ(k_t) v_tᵀ, z_t = z_{t-1} + φ(k_t), out_t = φ(q_t)S_t / (φ(q_t)·z_t + eps)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, _ = q.shape
    pq, pk = phi(q, True), phi(k, False)
    S = torch.zeros(B, H, pk.shape[-1], v.shape[-1], dtype=torch.float64)
    z = torch.zeros(B, H, pk.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(N):
        S = S + pk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + pk[:, :, t]
        num = torch.einsum("bhf,bhfd->bhd", pq[:, :, t], S)
        den = (pq[:, :, t] * z).sum(-1, keepdim=True) + eps
        outs.append(num / den)
    return torch.stack(outs, 2)


def favor_phi64(w):
    """FAVOR+ features in float64, unshifted: exp(W x̂ − |x̂|²/2)/√m, x̂ = x·D^(-1/4)."""
    w = w.double()

    def phi(x, is_query):
        xh = x * x.shape[-1] ** -0.25
        return torch.exp(xh @ w.T - 0.5 * (xh * xh).sum(-1, keepdim=True)) / w.shape[0] ** 0.5
    return phi


PHI64 = {"elu": phi_elu, "relu": phi_relu}


# ------------------------------------------------------------------ grids
# (id, B, Hq, Hkv, Nq, Nk, D, Dv, chunk)
SHAPES = (
    ("base", 2, 2, 2, 37, 37, 16, 16, 8),
    ("chunk_gt_n", 1, 2, 2, 17, 17, 8, 12, 128),
    ("gqa", 1, 4, 2, 45, 45, 16, 8, 16),
    ("mqa_nq_lt_nk", 2, 3, 1, 13, 40, 8, 8, 8),
    ("nq_gt_nk", 1, 2, 2, 40, 13, 8, 8, 8),
    ("one_query", 1, 2, 2, 1, 9, 8, 8, 4),
)
MAPS = ("elu", "relu", "favor")


def make(shape, seed=0, dtype=torch.float32):
    _, B, Hq, Hkv, Nq, Nk, D, Dv, chunk = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, Dv, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v, chunk


def feature_pair(name, D):
    if name == "favor":
        w = favor_projection(D, 24, generator=torch.Generator().manual_seed(1))
        return FavorPositive(w), favor_phi64(w)
    return name, PHI64[name]


def check_all(out, ref, inputs, tol=TOL):
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, g)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("fmap", MAPS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_matches_float64_formula(shape, fmap, causal):
    q, k, v, chunk = make(shape)
    fm, phi = feature_pair(fmap, q.shape[-1])
    out = linear_attention(q, k, v, feature_map=fm, causal=causal, chunk_size=chunk)
    ref = naive_linear(q, k, v, phi, causal=causal, eps=1e-6)
    assert out.shape == q.shape[:3] + v.shape[3:]
    check_all(out, ref, (q, k, v))


@pytest.mark.parametrize("fmap", MAPS)
def test_causal_equals_step_by_step_recurrence(fmap):
    q, k, v, _ = make(("r", 2, 2, 2, 50, 50, 16, 8, 0), seed=3)
    fm, phi = feature_pair(fmap, 16)
    out = linear_attention(q, k, v, feature_map=fm, causal=True, chunk_size=16)
    check_all(out, recurrent_linear(q, k, v, phi, eps=1e-6), (q, k, v))


@pytest.mark.parametrize("chunk", (1, 7, 64, 1000), ids=lambda c: f"chunk{c}")
def test_chunk_size_does_not_change_result(chunk):
    q, k, v, _ = make(("c", 1, 2, 2, 100, 100, 8, 8, 0), seed=4)
    a = linear_attention(q, k, v, causal=True, chunk_size=chunk)
    b = naive_linear(q, k, v, phi_elu, causal=True, eps=1e-6)
    check_all(a, b, (q, k, v))


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("fmap", MAPS)
def test_key_padding_mask(fmap, causal):
    q, k, v, _ = make(("p", 2, 2, 2, 30, 30, 8, 8, 0), seed=5)
    km = torch.ones(2, 30, dtype=torch.bool)
    km[1, 21:] = False
    km[0, :3] = False                                   # left padding too
    fm, phi = feature_pair(fmap, 8)
    out = linear_attention(q, k, v, feature_map=fm, causal=causal, key_padding_mask=km, chunk_size=8)
    ref = naive_linear(q, k, v, phi, causal=causal, eps=1e-6, key_mask=km)
    check_all(out, ref, (q, k, v))
    # padded keys are ignored: changing their content changes nothing
    k2 = k.detach().clone()
    v2 = v.detach().clone()
    k2[~km[:, None, :, None].expand_as(k2)] = 100.0
    v2[~km[:, None, :, None].expand_as(v2)] = -50.0
    out2 = linear_attention(q, k2, v2, feature_map=fm, causal=causal, key_padding_mask=km, chunk_size=8)
    assert torch.allclose(out2, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
def test_half_inputs_accumulate_in_float32(dtype):
    q, k, v, _ = make(("h", 1, 2, 2, 64, 64, 16, 16, 0), seed=6)
    ref = naive_linear(q, k, v, phi_elu, causal=True, eps=1e-6)
    out = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, chunk_size=16)
    assert out.dtype == dtype
    # the error is that of rounding the inputs and the output (2^-8 for bf16, 2^-11 for fp16)
    bound = 2 ** -6 if dtype == torch.bfloat16 else 2 ** -9
    assert rel_err(out, ref) <= bound
    out.float().sum().backward()


def test_strided_inputs_without_copy():
    x = torch.randn(2, 40, 3, 8, 3)                    # (B, N, H, D, qkv)
    q, k, v = (x[..., i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal, chunk_size=16)
        ref = naive_linear(q, k, v, phi_elu, causal=causal, eps=1e-6)
        assert rel_err(out, ref) <= TOL


def test_float64_inputs_stay_float64():
    q, k, v, _ = make(("d", 1, 1, 1, 20, 20, 4, 4, 0), dtype=torch.float64)
    out = linear_attention(q, k, v, causal=True, chunk_size=8)
    assert out.dtype == torch.float64
    assert rel_err(out, naive_linear(q, k, v, phi_elu, causal=True, eps=1e-6)) <= 1e-12


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_single_token_returns_its_value(causal):
    # one key: out = v·w/(w + eps) = v up to eps; d out/d q is O(eps) (ill-conditioned, not compared)
    q, k, v, _ = make(("t", 1, 1, 1, 1, 1, 8, 8, 0))
    out = linear_attention(q, k, v, causal=causal)
    assert torch.allclose(out, v, rtol=1e-5, atol=1e-6)
    (dv,) = torch.autograd.grad(out.sum(), (v,))
    assert torch.allclose(dv, torch.ones_like(dv), rtol=1e-5)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_favor_shifts_do_not_change_the_result(causal):
    """The stabilising shifts only rescale: large inputs (exponents far from 0) still give
    the unshifted float64 formula, and the causal output at t ignores keys after t (the
    key max is taken over all keys, eps is rescaled with it)."""
    q, k, v, _ = make(("s", 1, 2, 2, 30, 30, 8, 8, 0), seed=8)
    fm, phi = feature_pair("favor", 8)
    with torch.no_grad():
        k3 = k * 3.0
        out = linear_attention(q * 3.0, k3, v, feature_map=fm, causal=causal, chunk_size=8)
        assert rel_err(out, naive_linear(q * 3.0, k3, v, phi, causal=causal, eps=1e-6)) <= TOL
        if causal:
            k4 = k3.clone()
            k4[:, :, 20:] *= 2.0                       # raises the key max, changes the shift
            out4 = linear_attention(q * 3.0, k4, v, feature_map=fm, causal=True, chunk_size=8)
            assert torch.allclose(out4[:, :, :20], out[:, :, :20], rtol=1e-5, atol=1e-7)


def test_no_allowed_key_gives_zero():
    q, k, v, _ = make(("z", 1, 1, 1, 10, 4, 4, 4, 0))
    out = linear_attention(q, k, v, causal=True, chunk_size=2)   # queries 0..5 precede every key
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    km = torch.zeros(1, 4, dtype=torch.bool)
    out = linear_attention(q, k, v, key_padding_mask=km)
    assert torch.equal(out, torch.zeros_like(out))


# ------------------------------------------------------------------ feature maps
def test_feature_map_registry_and_objects():
    assert set(FEATURE_MAPS) == {"elu", "relu"}
    assert isinstance(resolve_feature_map("elu"), EluPlusOne)
    assert isinstance(resolve_feature_map("relu"), Relu)
    fm = Relu()
    assert resolve_feature_map(fm) is fm
    assert EluPlusOne() == EluPlusOne() and hash(EluPlusOne()) == hash(EluPlusOne())
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(EluPlusOne()(x, is_query=True), phi_elu(x, True))
    assert (EluPlusOne()(x, is_query=False) > 0).all()
    assert repr(EluPlusOne()) == "EluPlusOne()"
    assert "num_features=24" in repr(FavorPositive(torch.randn(24, 8)))


def test_favor_key_shift_ignores_padded_keys():
    w = favor_projection(8, 16, generator=torch.Generator().manual_seed(0))
    fm = FavorPositive(w)
    k = torch.randn(1, 1, 10, 8)
    km = torch.ones(1, 1, 10, dtype=torch.bool)
    km[..., 5:] = False
    k_big = k.clone()
    k_big[..., 5:, :] = 50.0
    assert torch.allclose(fm.key_shift(k_big, km), fm.key_shift(k[..., :5, :]))
    assert fm.key_shift(k, torch.zeros_like(km)).abs().max() == 0     # no real key: shift 0, not -inf


@pytest.mark.parametrize(
    "kwargs, exc, match",
    (
        (dict(feature_map="softmax"), ValueError, "feature_map"),
        (dict(feature_map=3), TypeError, "feature_map"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(causal=1), TypeError, "causal"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(backend="triton", causal=True), ValueError, "triton"),
        (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(feature_map=FavorPositive(torch.randn(8, 5))), ValueError, "head_dim"),
    ),
    ids=("bad_map_name", "bad_map_type", "eps", "chunk", "causal_type", "backend", "triton_on_cpu", "mask_shape",
         "favor_dim"),
)
def test_validation(kwargs, exc, match):
    q = k = v = torch.randn(1, 2, 6, 4)
    with pytest.raises(exc, match=match):
        linear_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, match",
    (
        ((1, 2, 6), (1, 2, 6, 4), (1, 2, 6, 4), "rank 4"),
        ((1, 3, 6, 4), (1, 2, 6, 4), (1, 2, 6, 4), "multiple"),
        ((1, 2, 6, 4), (1, 2, 6, 5), (1, 2, 6, 4), "head dim"),
        ((1, 2, 6, 4), (1, 2, 6, 4), (1, 2, 7, 4), "length"),
        ((2, 2, 6, 4), (1, 2, 6, 4), (1, 2, 6, 4), "batch"),
    ),
    ids=("rank", "gqa", "head_dim", "v_len", "batch"),
)
def test_shape_validation(q_shape, k_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        linear_attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape))
