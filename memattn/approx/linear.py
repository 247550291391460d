"""Kernel linear attention (Katharopoulos et al., 2020) with pluggable feature maps.

    out_i = φ(q_i) · Σ_j φ(k_j) v_jᵀ / (φ(q_i) · Σ_j φ(k_j) + eps)

over all keys j (non-causal) or keys at positions ≤ the query's (causal, bottom-right
aligned: query i sits at position i + Nk − Nq). The causal form runs chunk by chunk with a
carried state S = Σ φ(k_j) v_jᵀ (F × Dv) and z = Σ φ(k_j) (F): memory O(N·D), never an
(N, F, Dv) tensor of prefix states. Its backward (:class:`_ChunkedCausalLinear`) recomputes
φ chunk by chunk: a forward sweep for dq and a reverse sweep, carrying R = Σ φ(q_i) g_iᵀ,
for dk and dv. On CUDA the causal form runs the Triton kernels of ``triton_linear``.
The derivation is in docs/approximate.md.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._common import check_key_mask, check_qkv, compute_dtype, group_queries, ungroup
from .feature_maps import FeatureMap, resolve_feature_map

__all__ = ["linear_attention", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 128
# exp() argument cap when rescaling eps by the feature shifts (float32-safe; beyond it eps
# dominates the denominator by > 1e28 and the output is 0 either way)
_EPS_LOG_MAX = 80.0


def eps_rows(eps: float, q_shift: torch.Tensor | None, k_shift: torch.Tensor | None) -> torch.Tensor | float:
    """eps in the units of shifted features: eps·exp(−c_q − c_k), per query row (shape of
    q_shift without its last axis), or the plain float when the map uses no shift."""
    if q_shift is None and k_shift is None:
        return eps
    c = (0.0 if q_shift is None else q_shift) + (0.0 if k_shift is None else k_shift)
    return eps * torch.exp(torch.clamp(-c, max=_EPS_LOG_MAX)).squeeze(-1)


def _phi_keys(fmap: FeatureMap, k: torch.Tensor, shift: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    pk = fmap(k, is_query=False, key_shift=shift)
    return pk if mask is None else pk * mask


class _ChunkedCausalLinear(torch.autograd.Function):
    """Causal linear attention, chunked forward and chunk-recomputing backward.

    Inputs are 5-D views: q (B, Hkv, g, Nq, D), k (B, Hkv, 1, Nk, D), v (B, Hkv, 1, Nk, Dv),
    mask None or float (B, 1, 1, Nk, 1). Saves only q, k, v, the output and the per-query
    denominator (B, Hkv, g, Nq)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, fmap: FeatureMap, eps: float, chunk: int):
        cdt = compute_dtype(q.dtype)
        B, Hkv, g, Nq, _ = q.shape
        Nk, Dv = k.shape[3], v.shape[4]
        off = Nk - Nq
        with torch.no_grad():
            shift = fmap.key_shift(k.to(cdt), None if mask is None else mask[..., 0] > 0)
            out = torch.zeros(B, Hkv, g, Nq, Dv, dtype=q.dtype, device=q.device)
            den = torch.ones(B, Hkv, g, Nq, dtype=cdt, device=q.device)   # rows before every key: out 0
            S = z = None
            for c0 in range(0, Nk, chunk):
                c1 = min(c0 + chunk, Nk)
                mc = None if mask is None else mask[:, :, :, c0:c1].to(cdt)
                pk = _phi_keys(fmap, k[:, :, :, c0:c1].to(cdt), shift, mc)     # [B,Hkv,1,C,F]
                vc = v[:, :, :, c0:c1].to(cdt)                                  # [B,Hkv,1,C,Dv]
                if S is None:
                    S = pk.new_zeros(B, Hkv, 1, pk.shape[-1], Dv)
                    z = pk.new_zeros(B, Hkv, 1, pk.shape[-1])
                i0, i1 = max(c0 - off, 0), min(c1 - off, Nq)
                if i1 > i0:
                    pq, sq = fmap.scaled(q[:, :, :, i0:i1].to(cdt), is_query=True)   # [B,Hkv,g,Ci,F]
                    allowed = _intra_mask(i0 + off, i1 + off, c0, c1, q.device)
                    a = torch.matmul(pq, pk.transpose(-1, -2)).masked_fill(~allowed, 0.0)  # [Ci, C]
                    num = torch.matmul(pq, S) + torch.matmul(a, vc)
                    d = torch.matmul(pq, z.unsqueeze(-1)).squeeze(-1) + a.sum(-1) + eps_rows(eps, sq, shift)
                    out[:, :, :, i0:i1] = (num / d.unsqueeze(-1)).to(q.dtype)
                    den[:, :, :, i0:i1] = d
                S = S + torch.matmul(pk.transpose(-1, -2), vc)
                z = z + pk.sum(-2)
        ctx.save_for_backward(q, k, v, mask, out, den, shift)
        ctx.fmap, ctx.eps, ctx.chunk = fmap, eps, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out, den, shift = ctx.saved_tensors
        fmap, chunk = ctx.fmap, ctx.chunk
        cdt = den.dtype
        B, Hkv, g, Nq, D = q.shape
        Nk, Dv = k.shape[3], v.shape[4]
        off = Nk - Nq
        dq = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        dv = torch.zeros_like(v) if ctx.needs_input_grad[2] else None

        def g_parts(i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
            # out = num / den  ->  d num = g / den ; d den = -(g · out) / den
            gi = grad_out[:, :, :, i0:i1].to(cdt)
            di = den[:, :, :, i0:i1]
            gn = gi / di.unsqueeze(-1)
            gd = -(gi * out[:, :, :, i0:i1].to(cdt)).sum(-1) / di
            return gn, gd

        # ---- forward sweep: dq, carrying S and z
        if dq is not None:
            S = z = None
            for c0 in range(0, Nk, chunk):
                c1 = min(c0 + chunk, Nk)
                mc = None if mask is None else mask[:, :, :, c0:c1].to(cdt)
                with torch.no_grad():
                    pk = _phi_keys(fmap, k[:, :, :, c0:c1].to(cdt), shift, mc)
                    vc = v[:, :, :, c0:c1].to(cdt)
                if S is None:
                    S = pk.new_zeros(B, Hkv, 1, pk.shape[-1], Dv)
                    z = pk.new_zeros(B, Hkv, 1, pk.shape[-1])
                i0, i1 = max(c0 - off, 0), min(c1 - off, Nq)
                if i1 > i0:
                    gn, gd = g_parts(i0, i1)
                    allowed = _intra_mask(i0 + off, i1 + off, c0, c1, q.device)
                    m = (torch.matmul(gn, vc.transpose(-1, -2)) + gd.unsqueeze(-1)).masked_fill(~allowed, 0.0)
                    dpq = (torch.matmul(gn, S.transpose(-1, -2)) + gd.unsqueeze(-1) * z.unsqueeze(-2)
                           + torch.matmul(m, pk))
                    with torch.enable_grad():
                        qc = q[:, :, :, i0:i1].detach().to(cdt).requires_grad_(True)
                        (gq,) = torch.autograd.grad(fmap(qc, is_query=True), qc, dpq)
                    dq[:, :, :, i0:i1] = gq.to(q.dtype)
                S = S + torch.matmul(pk.transpose(-1, -2), vc)
                z = z + pk.sum(-2)

        # ---- reverse sweep: dk, dv, carrying R = Σ φ(q)ᵀ gn and r = Σ φ(q) gd over later queries
        if dk is not None or dv is not None:
            R = r = None
            last = ((Nk - 1) // chunk) * chunk
            for c0 in range(last, -1, -chunk):
                c1 = min(c0 + chunk, Nk)
                mc = None if mask is None else mask[:, :, :, c0:c1].to(cdt)
                vc = v[:, :, :, c0:c1].to(cdt)
                with torch.enable_grad():
                    kc = k[:, :, :, c0:c1].detach().to(cdt).requires_grad_(dk is not None)
                    pk = _phi_keys(fmap, kc, shift, mc)
                if R is None:
                    R = pk.new_zeros(B, Hkv, 1, pk.shape[-1], Dv)
                    r = pk.new_zeros(B, Hkv, 1, pk.shape[-1])
                pkd = pk.detach()
                dpk = torch.matmul(vc, R.transpose(-1, -2)) + r.unsqueeze(-2)      # [B,Hkv,1,C,F]
                dvc = torch.matmul(pkd, R)                                         # [B,Hkv,1,C,Dv]
                i0, i1 = max(c0 - off, 0), min(c1 - off, Nq)
                pq = gn = gd = None
                if i1 > i0:
                    gn, gd = g_parts(i0, i1)
                    pq = fmap(q[:, :, :, i0:i1].to(cdt), is_query=True).detach()
                    allowed = _intra_mask(i0 + off, i1 + off, c0, c1, q.device)
                    m = (torch.matmul(gn, vc.transpose(-1, -2)) + gd.unsqueeze(-1)).masked_fill(~allowed, 0.0)
                    a = torch.matmul(pq, pkd.transpose(-1, -2)).masked_fill(~allowed, 0.0)
                    dpk = dpk + torch.matmul(m.transpose(-1, -2), pq).sum(2, keepdim=True)
                    dvc = dvc + torch.matmul(a.transpose(-1, -2), gn).sum(2, keepdim=True)
                if dk is not None:
                    (gk,) = torch.autograd.grad(pk, kc, dpk)
                    dk[:, :, :, c0:c1] = gk.to(k.dtype)
                if dv is not None:
                    dvc = dvc if mc is None else dvc * mc
                    dv[:, :, :, c0:c1] = dvc.to(v.dtype)
                if pq is not None:
                    R = R + torch.matmul(pq.transpose(-1, -2), gn).sum(2, keepdim=True)
                    r = r + torch.matmul(pq.transpose(-1, -2), gd.unsqueeze(-1)).squeeze(-1).sum(2, keepdim=True)
        return dq, dk, dv, None, None, None, None


def _intra_mask(t0: int, t1: int, c0: int, c1: int, device: torch.device) -> torch.Tensor:
    """bool (t1 - t0, c1 - c0): key position <= query position inside one chunk."""
    tq = torch.arange(t0, t1, device=device)[:, None]
    tk = torch.arange(c0, c1, device=device)[None, :]
    return tk <= tq


def _noncausal(q5, k5, v5, mask, fmap: FeatureMap, eps: float) -> torch.Tensor:
    cdt = compute_dtype(q5.dtype)
    kf = k5.to(cdt)
    shift = fmap.key_shift(kf, None if mask is None else mask[..., 0] > 0)
    pq, sq = fmap.scaled(q5.to(cdt), is_query=True)         # [B,Hkv,g,Nq,F]
    pk = _phi_keys(fmap, kf, shift, None if mask is None else mask.to(cdt))   # [B,Hkv,1,Nk,F]
    kv = torch.matmul(pk.transpose(-1, -2), v5.to(cdt))     # [B,Hkv,1,F,Dv]
    z = pk.sum(-2)                                          # [B,Hkv,1,F]
    num = torch.matmul(pq, kv)
    e = eps_rows(eps, sq, shift)
    den = torch.matmul(pq, z.unsqueeze(-1)) + (e.unsqueeze(-1) if isinstance(e, torch.Tensor) else e)
    return (num / den).to(q5.dtype)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     feature_map: str | FeatureMap = "elu", causal: bool = False, eps: float = 1e-6,
                     key_padding_mask: torch.Tensor | None = None, chunk_size: int | None = None,
                     backend: Literal["auto", "pytorch", "triton"] = "auto") -> torch.Tensor:
    """Kernel linear attention: ``φ(q_i)·Σ_j φ(k_j) v_jᵀ / (φ(q_i)·Σ_j φ(k_j) + eps)``.

    Memory O(N·D): the non-causal form builds the (F, Dv) summary once; the causal form
    runs chunk by chunk with a carried state in the forward and in the backward.

    Args:
        q: (B, Hq, Nq, D) queries. k: (B, Hkv, Nk, D) keys (Hq % Hkv == 0: GQA/MQA).
        v: (B, Hkv, Nk, Dv) values.
        feature_map: a name in ``FEATURE_MAPS`` ("elu": elu+1, "relu") or a
            :class:`~memattn.approx.feature_maps.FeatureMap` (e.g. ``FavorPositive``).
        causal: only keys at positions <= the query's (query i at i + Nk − Nq).
        eps: added to the denominator (a query with no allowed key returns 0).
        key_padding_mask: optional (B, Nk) bool, True = real key; padded keys contribute nothing.
        chunk_size: rows per chunk of the causal form (default 128 on the CPU path).
        backend: "auto" (Triton for causal CUDA inputs with Nq == Nk, else PyTorch),
            "pytorch", or "triton" (raises if it cannot serve the call).
    Returns:
        (B, Hq, Nq, Dv) in q's dtype (accumulation in float32, float64 for float64).

    Example:
        >>> import torch
        >>> from memattn.approx import linear_attention
        >>> q, k, v = (torch.randn(2, 4, 1000, 32) for _ in range(3))
        >>> linear_attention(q, k, v, causal=True).shape
        torch.Size([2, 4, 1000, 32])
    """
    check_qkv(q, k, v)
    fmap = resolve_feature_map(feature_map)
    fmap.num_features(q.shape[-1])  # validates the head dim against a projection
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if backend not in ("auto", "pytorch", "triton"):
        raise ValueError(f"backend must be 'auto', 'pytorch' or 'triton', got {backend!r}")
    km = check_key_mask(key_padding_mask, k)
    Hkv = k.shape[1]
    triton_ok = causal and q.is_cuda and q.shape[2] == k.shape[2]
    if backend == "triton" and not triton_ok:
        raise ValueError("backend='triton' serves causal attention on CUDA tensors with Nq == Nk only")
    if backend == "triton" or (backend == "auto" and triton_ok):
        from .triton_linear import triton_causal_linear_attention
        return triton_causal_linear_attention(q, k, v, feature_map=fmap, eps=float(eps),
                                              key_padding_mask=km, chunk_size=chunk_size)
    q5 = group_queries(q, Hkv)
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    mask = None if km is None else km[:, None, None, :, None]
    if not causal:
        return ungroup(_noncausal(q5, k5, v5, mask, fmap, float(eps)))
    out = _ChunkedCausalLinear.apply(q5, k5, v5, None if mask is None else mask.to(compute_dtype(q.dtype)),
                                     fmap, float(eps), chunk_size or DEFAULT_CHUNK)
    return ungroup(out)
