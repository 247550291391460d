"""Synthesizer (Tay et al., 2021): attention weights synthesised without query–key dot products.

    out = softmax(S) v,   S = dense:      relu(x W₁ + b₁) W₂ + b₂   (each token scores max_len positions)
                              random:     R (learned or fixed, H × max_len × max_len)
                              factorized: R₁ R₂ᵀ (low-rank random)
                              mixed:      α₁ S + α₂ q kᵀ/√D

Scores are truncated to the sequence length; causal variants mask keys after the query.
Memory O(N²) (the score matrix), like naive attention: Synthesizer trades the dot product,
not memory. The layer (memattn.nn) builds S; this module applies it.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, softmax_with_mask

__all__ = ["synthesizer_attention"]


def synthesizer_attention(scores: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                          key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(scores) v`` with causal and key-padding masks (a row with no key gives 0).

    Args:
        scores: (B or 1, Hq, Nq, Nk) synthesised scores.
        v: (B, Hkv, Nk, Dv) values, Hq % Hkv == 0 (query head h uses value head h // (Hq/Hkv)).
        causal: keep keys at positions <= the query's (query i at i + Nk − Nq).
        key_padding_mask: optional (B, Nk), True = real key.
    Returns:
        (B, Hq, Nq, Dv) in v's dtype.

    Example:
        >>> s, v = torch.randn(1, 2, 10, 10), torch.randn(3, 2, 10, 8)
        >>> synthesizer_attention(s, v, causal=True).shape
        torch.Size([3, 2, 10, 8])
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(f"scores must be a (B, H, Nq, Nk) tensor, got {getattr(scores, 'shape', type(scores))}")
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise ValueError(f"v must be a (B, Hkv, Nk, Dv) tensor, got {getattr(v, 'shape', type(v))}")
    B, Hkv, Nk, Dv = v.shape
    Hq, Nq = scores.shape[1], scores.shape[2]
    if scores.shape[-1] != Nk:
        raise ValueError(f"scores cover {scores.shape[-1]} keys, v has {Nk}")
    if scores.shape[0] not in (1, B):
        raise ValueError(f"scores batch {scores.shape[0]} must be 1 or v's {B}")
    if Hq % Hkv != 0:
        raise ValueError(f"scores' heads ({Hq}) must be a multiple of v's heads ({Hkv})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    cdt = compute_dtype(v.dtype)
    allowed = None
    if causal:
        t = torch.arange(Nq, device=v.device)[:, None] + (Nk - Nq)
        allowed = torch.arange(Nk, device=v.device)[None, :] <= t           # [Nq, Nk]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(B, Nk)}, got {tuple(key_padding_mask.shape)}")
        km = key_padding_mask.to(device=v.device, dtype=torch.bool)[:, None, None, :]
        allowed = km if allowed is None else allowed & km
    p = softmax_with_mask(scores.to(cdt), allowed)                            # [B,Hq,Nq,Nk]
    g = Hq // Hkv
    p5 = p.reshape(p.shape[0], Hkv, g, Nq, Nk)
    out = torch.matmul(p5, v.to(cdt).unsqueeze(2))                            # [B,Hkv,g,Nq,Dv]
    return out.reshape(B, Hq, Nq, Dv).to(v.dtype)
