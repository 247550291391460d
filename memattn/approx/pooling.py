"""Attention pooling: queries attend to keys and values pooled over windows (and, Funnel
Transformer style, queries may be pooled too).

A pooler cuts n positions into windows [start_p, end_p) and reduces each to one row:
average, max, a learned depthwise strided convolution, or adaptive average pooling to a
target length. Causal-safe: a query at position t sees a pooled key only when the whole
window lies at or before t (end_p − 1 <= t), and sees the raw keys after the last such
window up to itself, so no query ever sees a pooled future key. Only complete windows are
pooled in the causal form (a trailing partial window stays raw), so the output at t does
not depend on what follows t (decoding with a KV cache gives the same result); adaptive
pooling, whose windows depend on the length, has no causal form. Scores over pooled keys
are (Nq, ⌈Nk/stride⌉): memory O(N²/stride).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ._common import check_key_mask, check_qkv, compute_dtype, group_queries, resolve_scale, softmax_with_mask, ungroup

__all__ = ["Pooler", "AvgPool", "MaxPool", "AdaptiveAvgPool", "ConvPool", "POOLS", "resolve_pooler",
           "pooled_attention"]


class Pooler:
    """Base class: windows over n positions and a reduction of each window to one row."""

    name: ClassVar[str] = "pool"

    def windows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 (P,) window starts and ends (exclusive), ends non-decreasing, covering [0, n)."""
        raise NotImplementedError

    def causal_windows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows a causal query may use: those that do not depend on n (complete
        windows), so that a prefix of the sequence is pooled the same whatever follows."""
        raise ValueError(f"{type(self).__name__} has no causal form")

    def reduce(self, xw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(..., P, W, d) gathered windows and bool (..., P, W) validity -> (..., P, d)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, valid: torch.Tensor | None = None, *,
                 causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pool x (..., n, d); valid (..., n) bool (True = real) or None; ``causal``: only
        the :meth:`causal_windows`.

        Returns the pooled rows (..., P, d) and, when ``valid`` is given, which pooled rows
        hold at least one real position (..., P)."""
        n = x.shape[-2]
        start, end = self.causal_windows(n) if causal else self.windows(n)
        if start.numel() == 0:
            return x.new_zeros(x.shape[:-2] + (0, x.shape[-1])), (None if valid is None else
                                                                  valid.new_zeros(valid.shape[:-1] + (0,)))
        start, end = start.to(x.device), end.to(x.device)
        width = int((end - start).max())
        idx = start[:, None] + torch.arange(width, device=x.device)[None, :]      # [P, W]
        inwin = idx < end[:, None]
        idx = idx.clamp(max=n - 1)
        xw = x[..., idx, :]                                                       # [..., P, W, d]
        ok = inwin if valid is None else inwin & valid[..., idx]
        ok = torch.broadcast_to(ok, xw.shape[:-1])
        pooled = self.reduce(xw, ok)
        return pooled, (None if valid is None else ok.any(-1))


def _strided_windows(n: int, stride: int, complete_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    last = (n // stride) * stride if complete_only else n
    start = torch.arange(0, last, stride, dtype=torch.int64)
    return start, torch.clamp(start + stride, max=n)


def _check_stride(stride: int) -> None:
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")


@dataclass(frozen=True)
class AvgPool(Pooler):
    """Mean of each window of ``stride`` positions (the last may be shorter), real rows only.

    Example:
        >>> AvgPool(2)(torch.arange(5.0)[:, None])[0].flatten().tolist()
        [0.5, 2.5, 4.0]
    """

    stride: int = 2
    name: ClassVar[str] = "avg"

    def __post_init__(self) -> None:
        _check_stride(self.stride)

    def windows(self, n):
        return _strided_windows(n, self.stride)

    def causal_windows(self, n):
        return _strided_windows(n, self.stride, complete_only=True)

    def reduce(self, xw, valid):
        w = valid.to(xw.dtype).unsqueeze(-1)
        return (xw * w).sum(-2) / w.sum(-2).clamp_min(1.0)


@dataclass(frozen=True)
class MaxPool(Pooler):
    """Elementwise max over each window of ``stride`` positions (real rows only; 0 if none).

    Example:
        >>> MaxPool(2)(torch.tensor([[1.0], [3.0], [2.0]]))[0].flatten().tolist()
        [3.0, 2.0]
    """

    stride: int = 2
    name: ClassVar[str] = "max"

    def __post_init__(self) -> None:
        _check_stride(self.stride)

    def windows(self, n):
        return _strided_windows(n, self.stride)

    def causal_windows(self, n):
        return _strided_windows(n, self.stride, complete_only=True)

    def reduce(self, xw, valid):
        m = xw.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(-2)
        return torch.where(valid.any(-1, keepdim=True), m, torch.zeros_like(m))


@dataclass(frozen=True)
class AdaptiveAvgPool(Pooler):
    """Mean over ``target_len`` windows [⌊p·n/L⌋, ⌈(p+1)·n/L⌉) (as adaptive_avg_pool1d); L is
    capped at n. No causal form: the windows depend on n.

    Example:
        >>> AdaptiveAvgPool(2)(torch.arange(4.0)[:, None])[0].flatten().tolist()
        [0.5, 2.5]
    """

    target_len: int = 64
    name: ClassVar[str] = "adaptive"

    def __post_init__(self) -> None:
        if not isinstance(self.target_len, int) or isinstance(self.target_len, bool) or self.target_len < 1:
            raise ValueError(f"target_len must be a positive int, got {self.target_len!r}")

    def windows(self, n):
        L = min(self.target_len, n)
        p = torch.arange(L, dtype=torch.int64)
        return torch.div(p * n, L, rounding_mode="floor"), -torch.div(-(p + 1) * n, L, rounding_mode="floor")

    def reduce(self, xw, valid):
        return AvgPool.reduce(self, xw, valid)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class ConvPool(Pooler):
    """Learned depthwise strided convolution: row p = bias + Σ_w weight[:, w] ⊙ x[p·s + w],
    s = weight.shape[1] (kernel = stride); positions past the end and padded rows count 0.

    Args:
        weight: (d, stride) per-channel taps. bias: (d,) or None.
    Example:
        >>> w = torch.full((1, 2), 0.5)
        >>> ConvPool(w)(torch.arange(4.0)[:, None])[0].flatten().tolist()
        [0.5, 2.5]
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    name: ClassVar[str] = "conv"

    def __post_init__(self) -> None:
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2:
            raise ValueError("ConvPool weight must be a (d, stride) tensor")
        if self.bias is not None and self.bias.shape != self.weight.shape[:1]:
            raise ValueError(f"ConvPool bias must have shape ({self.weight.shape[0]},), got {tuple(self.bias.shape)}")

    @property
    def stride(self) -> int:
        return self.weight.shape[1]

    def windows(self, n):
        return _strided_windows(n, self.stride)

    def causal_windows(self, n):
        return _strided_windows(n, self.stride, complete_only=True)

    def reduce(self, xw, valid):
        if xw.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"ConvPool weight has {self.weight.shape[0]} channels, inputs have {xw.shape[-1]}")
        w = self.weight.to(xw.dtype).transpose(0, 1)[: xw.shape[-2]]          # [W, d]
        out = (xw * valid.to(xw.dtype).unsqueeze(-1) * w).sum(-2)
        return out if self.bias is None else out + self.bias.to(xw.dtype)


# Parameter-free poolers by name: name -> factory(stride, target_len).
POOLS: dict[str, Callable[[int, int | None], Pooler]] = {
    AvgPool.name: lambda stride, target_len: AvgPool(stride),
    MaxPool.name: lambda stride, target_len: MaxPool(stride),
    AdaptiveAvgPool.name: lambda stride, target_len: AdaptiveAvgPool(64 if target_len is None else target_len),
}


def resolve_pooler(pool: str | Pooler, stride: int = 2, target_len: int | None = None) -> Pooler:
    """A :class:`Pooler` from a name in :data:`POOLS` (with ``stride`` / ``target_len``) or an instance."""
    if isinstance(pool, Pooler):
        return pool
    if isinstance(pool, str):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {sorted(POOLS)} or a Pooler (e.g. ConvPool), got {pool!r}")
        _check_stride(stride)
        return POOLS[pool](stride, target_len)
    raise TypeError(f"pool must be a str or a Pooler, got {type(pool).__name__}")


def pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pool: str | Pooler = "avg",
                     stride: int = 2, pool_queries: bool = False, causal: bool = False,
                     target_len: int | None = None, pool_v: Pooler | None = None, scale: float | None = None,
                     key_padding_mask: torch.Tensor | None = None,
                     query_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over pooled keys/values (optionally pooled queries).

    Non-causal: ``out_i = Σ_p softmax_p(q_i·k̄_p·scale) v̄_p`` over the pooled rows.
    Causal (``pool_queries=False`` only; strided poolers): query i at position t = i + Nk − Nq
    attends to the complete pooled windows ending at or before t and to the raw keys from
    the end of the last such window up to t (one softmax over both), never to a window
    holding a future key; the result at t does not depend on keys after t.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) (GQA allowed).
        pool: "avg", "max", "adaptive" (to ``target_len`` windows) or a :class:`Pooler`
            such as :class:`ConvPool`. stride: window length of "avg"/"max".
        pool_queries: pool the queries with the same pooler (Funnel); the output then has
            one row per query window.
        causal: the causal-safe form described above.
        target_len: windows of "adaptive" (default 64).
        pool_v: a different pooler for the values (e.g. a second ConvPool); default ``pool``.
        scale: score scale, default D ** -0.5.
        key_padding_mask: optional (B, Nk), True = real key; query_padding_mask: optional
            (B, Nq) for pooled queries.
    Returns:
        (B, Hq, Nq, Dv), or (B, Hq, Pq, Dv) with pooled queries; q's dtype.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
        >>> pooled_attention(q, k, v, stride=4, causal=True).shape
        torch.Size([1, 2, 100, 16])
        >>> pooled_attention(q, k, v, stride=4, pool_queries=True).shape
        torch.Size([1, 2, 25, 16])
    """
    check_qkv(q, k, v)
    pooler = resolve_pooler(pool, stride, target_len)
    pooler_v = pooler if pool_v is None else resolve_pooler(pool_v)
    if not isinstance(causal, bool) or not isinstance(pool_queries, bool):
        raise TypeError("causal and pool_queries must be bools")
    if causal and pool_queries:
        raise ValueError("pool_queries=True has no causal form: a pooled query mixes future positions")
    if pooler_v.windows(k.shape[2])[0].shape != pooler.windows(k.shape[2])[0].shape:
        raise ValueError("pool_v must cut the keys into the same windows as pool")
    scale = resolve_scale(scale, q.shape[-1])
    km = check_key_mask(key_padding_mask, k)
    cdt = compute_dtype(q.dtype)
    Hkv, Nq, Nk = k.shape[1], q.shape[2], k.shape[2]
    k4, v4 = k.to(cdt), v.to(cdt)
    kvalid = None if km is None else km[:, None, :]                      # [B,1,Nk]
    if causal and isinstance(pooler, AdaptiveAvgPool):
        raise ValueError("pool='adaptive' has no causal form: its windows depend on the sequence length")
    kp, pvalid = pooler(k4, kvalid, causal=causal)                      # [B,Hkv,P,D], [B,1,P]
    vp, _ = pooler_v(v4, kvalid, causal=causal)
    qq = q.to(cdt)
    if pool_queries:
        qm = None
        if query_padding_mask is not None:
            if query_padding_mask.shape != (q.shape[0], Nq):
                raise ValueError(f"query_padding_mask must have shape (B, Nq) = {(q.shape[0], Nq)}")
            qm = query_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, :]
        qq, _ = pooler(qq, qm)
    q5 = group_queries(qq, Hkv)                                          # [B,Hkv,g,Nq',D]
    kp5, vp5 = kp.unsqueeze(2), vp.unsqueeze(2)
    s_pool = torch.matmul(q5, kp5.transpose(-1, -2)) * scale             # [Nq', P]
    allowed = None if pvalid is None else pvalid[:, :, None, None, :]    # [B,1,1,1,P]
    if not causal:
        p = softmax_with_mask(s_pool, allowed)
        return ungroup(torch.matmul(p, vp5)).to(q.dtype)

    # causal: complete pooled windows ending at or before t, plus the raw keys in [L(t), t]
    start, end = pooler.causal_windows(Nk)
    end = end.to(q.device)
    t = torch.arange(Nq, device=q.device) + (Nk - Nq)                   # query positions
    vis = (end[None, :] - 1) <= t[:, None]                               # [Nq, P]
    allowed = vis if allowed is None else allowed & vis
    cnt = torch.searchsorted(end, t + 1, right=True)                     # windows with end <= t+1
    if end.numel():
        last_end = torch.where(cnt > 0, end[(cnt - 1).clamp(min=0)], torch.zeros_like(cnt))
    else:
        last_end = torch.zeros_like(cnt)
    width = max(1, int((end - start.to(q.device)).max()) if end.numel() else Nk)
    idx = last_end[:, None] + torch.arange(width, device=q.device)[None, :]   # [Nq, W]
    lvalid = (idx <= t[:, None]) & (idx >= 0)
    idx = idx.clamp(0, Nk - 1)
    if km is not None:
        lvalid = lvalid & km[:, idx][:, None, None]                      # [B,1,1,Nq,W]
    k_loc = k4.unsqueeze(2)[:, :, :, idx]                                # [B,Hkv,1,Nq,W,D]
    v_loc = v4.unsqueeze(2)[:, :, :, idx]
    s_loc = (q5.unsqueeze(-2) * k_loc).sum(-1) * scale                  # [B,Hkv,g,Nq,W]
    P = s_pool.shape[-1]
    s_all = torch.cat([s_pool, s_loc], dim=-1)
    ok = torch.cat([torch.broadcast_to(allowed, s_pool.shape), torch.broadcast_to(lvalid, s_loc.shape)], dim=-1)
    p = softmax_with_mask(s_all, ok)
    out = torch.matmul(p[..., :P], vp5) + (p[..., P:].unsqueeze(-1) * v_loc).sum(-2)
    return ungroup(out).to(q.dtype)
