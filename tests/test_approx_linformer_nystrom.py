"""Linformer and Nyström attention against float64 implementations of their formulas."""

from __future__ import annotations

import pytest
import torch

from memattn.approx import iterative_pinv, linformer_attention, nystrom_attention
from memattn.approx.nystrom import segment_ids

TOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def grads_match(out, ref, inputs, tol=TOL):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype))
    want = torch.autograd.grad(ref, inputs, g)
    return [rel_err(a, b) for a, b in zip(got, want)]


def qkv(B, Hq, Hkv, Nq, Nk, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=gen).requires_grad_(),
            torch.randn(B, Hkv, Nk, D, generator=gen).requires_grad_(),
            torch.randn(B, Hkv, Nk, D, generator=gen).requires_grad_())


# ------------------------------------------------------------------ Linformer
def linformer_ref(q, k, v, e, f, key_mask=None):
    q, k, v, e, f = (t.double() for t in (q, k, v, e, f))
    g = q.shape[1] // k.shape[1]
    if key_mask is not None:
        k = k * key_mask[:, None, :, None]
        v = v * key_mask[:, None, :, None]
    if e.dim() == 3:
        e, f = e.repeat_interleave(g, 0), f.repeat_interleave(g, 0)
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    kp = torch.einsum("...rn,bhnd->bhrd", e, k) if e.dim() == 2 else torch.einsum("hrn,bhnd->bhrd", e, k)
    vp = torch.einsum("...rn,bhnd->bhrd", f, v) if f.dim() == 2 else torch.einsum("hrn,bhnd->bhrd", f, v)
    s = q @ kp.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s, -1) @ vp


# (id, B, Hq, Hkv, Nq, Nk, D, r, per_head)
LIN = (
    ("shared", 2, 2, 2, 37, 37, 16, 8, False),
    ("per_head_gqa", 1, 4, 2, 20, 29, 8, 5, True),
    ("r_gt_n", 1, 2, 2, 6, 6, 8, 10, False),
)


@pytest.mark.parametrize("case", LIN, ids=[c[0] for c in LIN])
def test_linformer_matches_float64_formula(case):
    _, B, Hq, Hkv, Nq, Nk, D, r, per_head = case
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    gen = torch.Generator().manual_seed(2)
    shape = (Hkv, r, Nk) if per_head else (r, Nk)
    e = (torch.randn(shape, generator=gen) / r ** 0.5).requires_grad_()
    f = (torch.randn(shape, generator=gen) / r ** 0.5).requires_grad_()
    out = linformer_attention(q, k, v, proj_k=e, proj_v=f)
    ref = linformer_ref(q, k, v, e, f)
    assert out.shape == (B, Hq, Nq, D)
    assert rel_err(out, ref) <= TOL
    assert max(grads_match(out, ref, (q, k, v, e, f))) <= TOL


def test_linformer_padding_equals_unpadded_prefix():
    q, k, v = qkv(2, 2, 2, 30, 30, 8, seed=1)
    e = torch.randn(6, 30) / 6 ** 0.5
    km = torch.ones(2, 30, dtype=torch.bool)
    km[1, 22:] = False
    out = linformer_attention(q, k, v, proj_k=e, proj_v=e, key_padding_mask=km)
    assert rel_err(out, linformer_ref(q, k, v, e, e, km)) <= TOL
    short = linformer_attention(q[1:, :, :22], k[1:, :, :22], v[1:, :, :22], proj_k=e[:, :22], proj_v=e[:, :22])
    assert torch.allclose(out[1:, :, :22], short, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "pk, pv, match",
    (
        (torch.randn(4, 10), torch.randn(4, 10), "Nk=12"),
        (torch.randn(4, 12), torch.randn(5, 12), "share r"),
        (torch.randn(3, 4, 12), torch.randn(3, 4, 12), "heads"),
        (torch.randn(12), torch.randn(12), r"\(r, Nk\)"),
    ),
    ids=("length", "rank", "heads", "rank1"),
)
def test_linformer_validation(pk, pv, match):
    q, k, v = qkv(1, 2, 2, 12, 12, 4)
    with pytest.raises(ValueError, match=match):
        linformer_attention(q, k, v, proj_k=pk, proj_v=pv)


# ------------------------------------------------------------------ Nyström
def segment_means64(x, m, key_mask=None):
    """Landmarks by explicit loops: segment p = rows [floor(p n / m), floor((p+1) n / m))."""
    n = x.shape[-2]
    rows = []
    for p in range(m):
        a, b = (p * n) // m, ((p + 1) * n) // m
        seg = x[..., a:b, :]
        if key_mask is None:
            rows.append(seg.mean(-2))
        else:
            w = key_mask[:, None, a:b, None].double()
            rows.append((seg * w).sum(-2) / w.sum(-2).clamp_min(1.0))
    return torch.stack(rows, -2)


def pinv64(a, iters):
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    z = a.transpose(-1, -2)
    z = z / (a.abs().sum(-2).amax(-1)[..., None, None] * a.abs().sum(-1).amax(-1)[..., None, None])
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_ref(q, k, v, m, iters, key_mask=None, query_mask=None):
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    m = min(m, q.shape[2], k.shape[2])
    s = q.shape[-1] ** -0.5
    ql, kl = segment_means64(q, m, query_mask), segment_means64(k, m, key_mask)
    f = torch.softmax(q @ kl.transpose(-1, -2) * s, -1)
    a = torch.softmax(ql @ kl.transpose(-1, -2) * s, -1)
    sb = ql @ k.transpose(-1, -2) * s
    if key_mask is not None:
        sb = sb.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    b = torch.softmax(sb, -1)
    return f @ pinv64(a, iters) @ (b @ v)


# (id, B, Hq, Hkv, Nq, Nk, D, landmarks, iters)
NYS = (
    ("divisible", 2, 2, 2, 32, 32, 16, 8, 6),
    ("not_divisible", 1, 2, 2, 37, 37, 8, 5, 6),
    ("gqa_nq_ne_nk", 1, 4, 2, 23, 41, 8, 7, 4),
    ("landmarks_gt_n", 1, 2, 2, 6, 6, 8, 64, 6),
)


@pytest.mark.parametrize("case", NYS, ids=[c[0] for c in NYS])
def test_nystrom_matches_float64_formula(case):
    _, B, Hq, Hkv, Nq, Nk, D, m, iters = case
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D, seed=3)
    out = nystrom_attention(q, k, v, num_landmarks=m, pinv_iterations=iters)
    ref = nystrom_ref(q, k, v, m, iters)
    assert out.shape == (B, Hq, Nq, D)
    assert rel_err(out, ref) <= TOL
    assert max(grads_match(out, ref, (q, k, v))) <= TOL


def test_nystrom_key_padding():
    q, k, v = qkv(2, 2, 2, 30, 30, 8, seed=4)
    km = torch.ones(2, 30, dtype=torch.bool)
    km[0, 25:] = False
    out = nystrom_attention(q, k, v, num_landmarks=6, key_padding_mask=km, query_padding_mask=km)
    ref = nystrom_ref(q, k, v, 6, 6, km, km)
    assert rel_err(out, ref) <= TOL
    assert max(grads_match(out, ref, (q, k, v))) <= TOL
    k2, v2 = k.detach().clone(), v.detach().clone()
    q2 = q.detach().clone()
    k2[0, :, 25:] = 30.0
    v2[0, :, 25:] = -9.0
    q2[0, :, 25:] = 7.0
    out2 = nystrom_attention(q2, k2, v2, num_landmarks=6, key_padding_mask=km, query_padding_mask=km)
    assert torch.allclose(out2[0, :, :25], out[0, :, :25], atol=1e-6)
    assert torch.allclose(out2[1], out[1], atol=1e-6)


def test_nystrom_with_every_token_a_landmark_is_exact_softmax():
    q, k, v = (t.detach().double() for t in qkv(1, 2, 2, 12, 12, 8, seed=5))
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
    out = nystrom_attention(q, k, v, num_landmarks=12, pinv_iterations=40)
    assert (out - exact).abs().max() < 1e-8


def test_iterative_pinv_converges_to_moore_penrose():
    a = torch.softmax(torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    assert torch.allclose(iterative_pinv(a, 40), torch.linalg.pinv(a), atol=1e-8)
    err6 = (iterative_pinv(a, 6) @ a - torch.eye(6, dtype=torch.float64)).abs().max()
    err2 = (iterative_pinv(a, 2) @ a - torch.eye(6, dtype=torch.float64)).abs().max()
    assert err6 < err2


@pytest.mark.parametrize("n, m", ((10, 3), (7, 7), (100, 64), (5, 1)), ids=("10_3", "7_7", "100_64", "5_1"))
def test_segment_ids_cover_contiguously(n, m):
    ids = segment_ids(n, m)
    want = torch.cat([torch.full(((p + 1) * n // m - p * n // m,), p) for p in range(m)])
    assert torch.equal(ids, want)


def test_nystrom_validation():
    q, k, v = qkv(1, 1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="num_landmarks"):
        nystrom_attention(q, k, v, num_landmarks=0)
    with pytest.raises(ValueError, match="pinv_iterations"):
        nystrom_attention(q, k, v, pinv_iterations=-1)
    with pytest.raises(ValueError, match="scale"):
        nystrom_attention(q, k, v, scale=-1.0)
