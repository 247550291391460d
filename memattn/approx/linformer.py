"""Linformer (Wang et al., 2020): softmax attention over keys and values projected to r rows.

    out = softmax(q (E k)ᵀ · scale) (F v),    E, F: (r, Nk)

Memory O(N·r). The projection mixes every position, so there is no causal form, and it
fixes the sequence length: a layer keeps E, F of length ``max_len`` and uses the first N
columns.
"""

from __future__ import annotations

import torch

from ._common import check_key_mask, check_qkv, compute_dtype, group_queries, resolve_scale, ungroup

__all__ = ["linformer_attention"]


def _check_proj(name: str, p: torch.Tensor, nk: int, hkv: int, ref: torch.Tensor) -> torch.Tensor:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if p.dim() not in (2, 3):
        raise ValueError(f"{name} must be (r, Nk) or per-head (Hkv, r, Nk), got shape {tuple(p.shape)}")
    if p.shape[-1] != nk:
        raise ValueError(f"{name} projects {p.shape[-1]} positions but the keys have Nk={nk}; "
                         f"slice the projection to the sequence length (N must not exceed its max_len)")
    if p.dim() == 3 and p.shape[0] != hkv:
        raise ValueError(f"per-head {name} has {p.shape[0]} heads, k has {hkv}")
    if p.device != ref.device:
        raise ValueError(f"{name} is on {p.device}, k on {ref.device}")
    if p.dim() == 2:
        return p.view(1, 1, 1, *p.shape)
    return p.view(1, p.shape[0], 1, *p.shape[1:])


def linformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, proj_k: torch.Tensor,
                        proj_v: torch.Tensor, scale: float | None = None,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Linformer attention: ``softmax(q (E k)ᵀ · scale) (F v)`` with E = proj_k, F = proj_v.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) (GQA allowed).
        proj_k: E, (r, Nk) shared by heads, or (Hkv, r, Nk) per head.
        proj_v: F, same shapes (may be the same tensor as proj_k: key-value sharing).
        scale: score scale, default D ** -0.5.
        key_padding_mask: optional (B, Nk), True = real; padded rows of k and v are zeroed
            before projection, so the result equals that of the unpadded sequence with the
            projections' first columns.
    Returns:
        (B, Hq, Nq, Dv) in q's dtype. Non-causal only (the projection mixes all positions).

    Example:
        >>> q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
        >>> e = torch.randn(8, 100) / 8 ** 0.5
        >>> linformer_attention(q, k, v, proj_k=e, proj_v=e).shape
        torch.Size([1, 2, 100, 16])
    """
    check_qkv(q, k, v)
    Hkv, Nk = k.shape[1], k.shape[2]
    e = _check_proj("proj_k", proj_k, Nk, Hkv, k)
    f = _check_proj("proj_v", proj_v, Nk, Hkv, k)
    if proj_k.shape[-2] != proj_v.shape[-2]:
        raise ValueError(f"proj_k and proj_v must share r, got {proj_k.shape[-2]} and {proj_v.shape[-2]}")
    scale = resolve_scale(scale, q.shape[-1])
    km = check_key_mask(key_padding_mask, k)
    cdt = compute_dtype(q.dtype)
    k5, v5 = k.unsqueeze(2).to(cdt), v.unsqueeze(2).to(cdt)       # [B,Hkv,1,Nk,·]
    if km is not None:
        m = km[:, None, None, :, None].to(cdt)
        k5, v5 = k5 * m, v5 * m
    kp = torch.matmul(e.to(cdt), k5)                               # [r, Nk] @ [Nk, D] -> [B,Hkv,1,r,D]
    vp = torch.matmul(f.to(cdt), v5)                               # [B,Hkv,1,r,Dv]
    q5 = group_queries(q, Hkv).to(cdt)                             # [B,Hkv,g,Nq,D]
    p = torch.softmax(torch.matmul(q5, kp.transpose(-1, -2)) * scale, dim=-1)   # [Nq, r]
    return ungroup(torch.matmul(p, vp)).to(q.dtype)
