"""Performer FAVOR+ (Choromanski et al., 2021): softmax attention through positive random features.

exp(q·k/√D) = E_w[φ(q)·φ(k)] with φ(x) = exp(w·x̂ − |x̂|²/2)/√m, x̂ = x·D^(-1/4), w ~ N(0, I_D).
Orthogonal random features (blocks of D orthonormal rows, rows rescaled to chi(D) norms)
lower the variance at equal m. The attention itself is linear attention with the
:class:`~memattn.approx.feature_maps.FavorPositive` map, so the causal form is the chunked
O(N·D) path (Triton on CUDA).
"""

from __future__ import annotations

import torch

from ._common import check_qkv
from .feature_maps import FavorPositive
from .linear import linear_attention

__all__ = ["favor_projection", "performer_attention"]


def favor_projection(head_dim: int, num_features: int, *, orthogonal: bool = True,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Random projection W (num_features, head_dim) for FAVOR+ features.

    orthogonal=True: rows come in blocks of ``head_dim`` mutually orthogonal directions (QR
    of a Gaussian matrix, signs fixed so the block is Haar-distributed), each row rescaled to
    an independent chi(head_dim) length, so each row is marginally N(0, I). orthogonal=False:
    iid Gaussian rows. Draws on the CPU from ``generator`` (reproducible), then moves.

    Args:
        head_dim: D >= 1.
        num_features: m >= 1 (any value; the last block is truncated).
        orthogonal: orthogonal blocks (default) or iid rows.
        generator: a CPU torch.Generator for reproducible draws (default: global RNG).
        dtype, device: of the returned tensor.
    Returns:
        (num_features, head_dim) tensor.

    Example:
        >>> w = favor_projection(64, 256, generator=torch.Generator().manual_seed(0))
        >>> w.shape
        torch.Size([256, 64])
    """
    for name, val in (("head_dim", head_dim), ("num_features", num_features)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal must be a bool, got {type(orthogonal).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not orthogonal:
        w = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64)
        return w.to(dtype=dtype, device=device)
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        qm, rm = torch.linalg.qr(g)
        qm = qm * torch.sign(torch.diagonal(rm)).masked_fill(torch.diagonal(rm) == 0, 1.0)[None, :]
        blocks.append(qm.transpose(0, 1))            # rows orthonormal
    w = torch.cat(blocks, 0)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).to(dtype=dtype, device=device)


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, projection: torch.Tensor,
                        causal: bool = False, eps: float = 1e-6,
                        key_padding_mask: torch.Tensor | None = None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """FAVOR+ attention: linear attention with positive random features approximating softmax.

    ``out_i = φ(q_i)·Σ_j φ(k_j) v_jᵀ / (φ(q_i)·Σ_j φ(k_j) + eps)`` with
    ``φ(x) = exp(W x̂ − |x̂|²/2 − c)/√m``, x̂ = x·D^(-1/4); the stabiliser c (a query's own max,
    one max over all keys of a (batch, head)) cancels in the ratio.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) (GQA allowed).
        projection: (m, D) from :func:`favor_projection`, shared by all heads.
        causal: causal form (chunked, O(N·D) memory, Triton on CUDA).
        eps: denominator guard. key_padding_mask: optional (B, Nk), True = real key.
        chunk_size: rows per chunk of the causal form.
    Returns:
        (B, Hq, Nq, Dv) in q's dtype.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
        >>> w = favor_projection(16, 64, generator=torch.Generator().manual_seed(0))
        >>> performer_attention(q, k, v, projection=w, causal=True).shape
        torch.Size([1, 2, 128, 16])
    """
    check_qkv(q, k, v)
    if not isinstance(projection, torch.Tensor):
        raise TypeError(f"projection must be a torch.Tensor, got {type(projection).__name__}")
    if projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        raise ValueError(f"projection must have shape (num_features, {q.shape[-1]}), got {tuple(projection.shape)}")
    return linear_attention(q, k, v, feature_map=FavorPositive(projection), causal=causal, eps=eps,
                            key_padding_mask=key_padding_mask, chunk_size=chunk_size)
