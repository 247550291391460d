"""The oracle: naive O(N²) attention with a dense mask, any dtype (float64 included),
autograd by PyTorch. Readable first; it materialises the (B, H, Nq, Nk) scores."""

from __future__ import annotations

import torch

from .._dropout import keep_mask
from ..patterns import Pattern

__all__ = ["attention", "dense_mask"]


def dense_mask(pattern: Pattern | None, B: int, H: int, nq: int, nk: int, device: torch.device) -> torch.Tensor | None:
    """bool (B or 1, H or 1, nq, nk) mask of the pattern at absolute positions, or None."""
    if pattern is None:
        return None
    pattern = pattern.for_sizes(nq, nk)
    qp = (torch.arange(nq, dtype=torch.int64) + (nk - nq)).view(1, 1, nq, 1)
    kp = torch.arange(nk, dtype=torch.int64).view(1, 1, 1, nk)
    b = torch.arange(B, dtype=torch.int64).view(B, 1, 1, 1)
    h = torch.arange(H, dtype=torch.int64).view(1, H, 1, 1)
    m = torch.broadcast_to(pattern.mask(b, h, qp, kp), (B, H, nq, nk))
    return m.to(device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None, scale: float,
              softcap: float = 0.0, dropout_p: float = 0.0, dropout_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive attention on (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv) → out, lse (float32).

    Computation is in q's dtype for float32/float64 and in float32 for half types
    (softmax statistics always in at least float32), as a same-dtype reference.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.repeat_interleave(g, dim=1) if g > 1 else k
    vv = v.repeat_interleave(g, dim=1) if g > 1 else v
    s = torch.matmul(q.to(cdt), kk.to(cdt).transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    m = dense_mask(pattern, B, Hq, Nq, Nk, q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    if m is not None:
        p = p.masked_fill(~m, 0.0)
    if dropout_p > 0:
        bh = (torch.arange(B).view(B, 1, 1, 1) * Hq + torch.arange(Hq).view(1, Hq, 1, 1))
        keep = keep_mask(dropout_seed, bh, torch.arange(Nq).view(1, 1, Nq, 1), torch.arange(Nk).view(1, 1, 1, Nk),
                         dropout_p).to(q.device)
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, vv.to(cdt))
    return out.to(q.dtype), lse.to(torch.float32).detach()


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                       lse: torch.Tensor, *, pattern: Pattern | None, scale: float,
                       softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward in closed form, given the final out and lse (dense, naive)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.repeat_interleave(g, 1).to(cdt), v.repeat_interleave(g, 1).to(cdt)
    of, dof = out.to(cdt), dout.to(cdt)
    s_raw = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    s = softcap * torch.tanh(s_raw / softcap) if softcap > 0 else s_raw
    m = dense_mask(pattern, B, Hq, Nq, Nk, q.device)
    lse_f = lse.to(cdt)
    p = torch.exp(s - torch.where(torch.isfinite(lse_f), lse_f, torch.zeros_like(lse_f))[..., None])
    if m is not None:
        p = p.masked_fill(~m, 0.0)
    p = torch.where(torch.isfinite(lse_f)[..., None], p, torch.zeros_like(p))
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * of).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if softcap > 0:
        ds = ds * (1 - torch.tanh(s_raw / softcap) ** 2)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    if g > 1:
        dk = dk.reshape(B, Hkv, g, Nk, D).sum(2)
        dv = dv.reshape(B, Hkv, g, Nk, v.shape[3]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
