"""Shared input checks and small helpers of the approximate mechanisms (no maths here)."""

from __future__ import annotations

import torch

from .._checks import check_qkv_layout

__all__ = ["check_qkv", "check_key_mask", "compute_dtype", "group_queries", "ungroup", "resolve_scale",
           "softmax_with_mask"]

def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool = False) -> None:
    """Check the (B, H, N, D) layout of design.md §3 (GQA allowed); raise naming the argument."""
    check_qkv_layout(q, k, v)
    Nq = q.shape[2]
    if same_length and Nq != k.shape[2]:
        raise ValueError(f"this mechanism needs as many queries as keys, got Nq={Nq}, Nk={k.shape[2]}")


def check_key_mask(key_padding_mask: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
    """Validate a (B, Nk) key mask (True/1 = real key, False/0 = padding); return it as bool or None."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(k.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    return key_padding_mask.to(device=k.device, dtype=torch.bool)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, Hq, N, D) -> (B, Hkv, g, N, D): the g query heads that share one kv head (a view)."""
    B, Hq, N, D = q.shape
    return q.reshape(B, num_kv_heads, Hq // num_kv_heads, N, D)


def ungroup(x: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, g, N, D) -> (B, Hkv·g, N, D)."""
    B, Hkv, g, N, D = x.shape
    return x.reshape(B, Hkv * g, N, D)


def softmax_with_mask(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis keeping only ``allowed`` entries; a row with none gives zeros."""
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    s = scores.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    p = p.masked_fill(~allowed, 0.0)
    den = p.sum(dim=-1, keepdim=True)
    return p / torch.where(den > 0, den, torch.ones_like(den))
