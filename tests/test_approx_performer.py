"""FAVOR+: the projection's structure, performer_attention against its float64 formula
(outputs and gradients, causal and not), and that it approximates softmax attention."""

from __future__ import annotations

import math

import pytest
import torch

from memattn.approx import favor_projection, performer_attention

TOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def favor_ref(q, k, v, w, *, causal, eps=1e-6):
    """float64 FAVOR+ formula, unshifted."""
    q, k, v, w = q.double(), k.double(), v.double(), w.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    d, m = q.shape[-1], w.shape[0]

    def expo(x):
        xh = x / d ** 0.25
        return xh @ w.T - (xh * xh).sum(-1, keepdim=True) / 2

    pq = torch.exp(expo(q)) / math.sqrt(m)
    pk = torch.exp(expo(k)) / math.sqrt(m)
    a = pq @ pk.transpose(-1, -2)
    if causal:
        Nq, Nk = q.shape[2], k.shape[2]
        a = a * (torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + Nk - Nq)
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


# (id, B, Hq, Hkv, N, D, m)
CASES = (
    ("m_lt_d", 2, 2, 2, 33, 16, 12),
    ("m_gt_d", 1, 4, 2, 40, 8, 20),
    ("m_eq_d", 1, 2, 1, 17, 16, 16),
)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("orthogonal", (True, False), ids=("ortho", "iid"))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_performer_matches_float64_formula(case, orthogonal, causal):
    _, B, Hq, Hkv, N, D, m = case
    gen = torch.Generator().manual_seed(0)
    q = (0.5 * torch.randn(B, Hq, N, D, generator=gen)).requires_grad_()
    k = (0.5 * torch.randn(B, Hkv, N, D, generator=gen)).requires_grad_()
    v = torch.randn(B, Hkv, N, D, generator=gen).requires_grad_()
    w = favor_projection(D, m, orthogonal=orthogonal, generator=torch.Generator().manual_seed(1))
    out = performer_attention(q, k, v, projection=w, causal=causal, chunk_size=8)
    ref = favor_ref(q, k, v, w, causal=causal)
    assert rel_err(out, ref) <= TOL
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g.float()), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(a, b) <= TOL, name


@pytest.mark.parametrize("m", (1, 7, 64, 100), ids=lambda m: f"m{m}")
@pytest.mark.parametrize("d", (1, 8, 32), ids=lambda d: f"d{d}")
def test_projection_orthogonal_blocks_and_chi_norms(d, m):
    w = favor_projection(d, m, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert w.shape == (m, d) and w.dtype == torch.float64
    norms = w.norm(dim=1)
    for b0 in range(0, m, d):
        blk = w[b0:b0 + d] / norms[b0:b0 + d, None]
        gram = blk @ blk.T
        assert torch.allclose(gram, torch.eye(blk.shape[0], dtype=torch.float64), atol=1e-10)
    if m > 1:
        assert norms.std() > 0          # norms are drawn, not all sqrt(d)


def test_projection_rows_have_gaussian_second_moment():
    # each row is marginally N(0, I): E|w|² = d, and E[w wᵀ] = I over many draws
    d = 8
    w = favor_projection(d, 8 * 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cov = w.T @ w / w.shape[0]
    assert torch.allclose(cov, torch.eye(d, dtype=torch.float64), atol=0.05)
    assert abs((w.norm(dim=1) ** 2).mean().item() - d) < 0.2


def test_projection_seeded_and_iid():
    a = favor_projection(16, 40, generator=torch.Generator().manual_seed(5))
    b = favor_projection(16, 40, generator=torch.Generator().manual_seed(5))
    c = favor_projection(16, 40, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    iid = favor_projection(16, 40, orthogonal=False, generator=torch.Generator().manual_seed(5))
    blk = iid[:16] / iid[:16].norm(dim=1, keepdim=True)
    assert (blk @ blk.T - torch.eye(16)).abs().max() > 0.05     # iid rows are not orthogonal


def test_unbiased_estimate_of_softmax_attention():
    """With many features FAVOR+ approaches exact softmax attention."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (0.4 * torch.randn(1, 1, 64, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    errs = []
    for m in (16, 4096):
        w = favor_projection(16, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        errs.append((performer_attention(q, k, v, projection=w) - exact).norm() / exact.norm())
    assert errs[1] < 0.02 and errs[1] < errs[0] / 4


@pytest.mark.parametrize(
    "kwargs, exc, match",
    (
        (dict(head_dim=0, num_features=4), ValueError, "head_dim"),
        (dict(head_dim=4, num_features=-1), ValueError, "num_features"),
        (dict(head_dim=4, num_features=4, orthogonal="yes"), TypeError, "orthogonal"),
        (dict(head_dim=4, num_features=4, generator=1), TypeError, "generator"),
    ),
    ids=("head_dim", "num_features", "orthogonal", "generator"),
)
def test_projection_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        favor_projection(**kwargs)


def test_performer_validation():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="projection"):
        performer_attention(q, q, q, projection=torch.randn(4, 7))
    with pytest.raises(TypeError, match="projection"):
        performer_attention(q, q, q, projection=None)
