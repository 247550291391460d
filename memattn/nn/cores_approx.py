"""Approximate mechanisms as cores of :class:`memattn.nn.Attention`: their options and parameters.

Padding: padded keys' features/values are zeroed or masked inside each mechanism (see
each function's ``key_padding_mask``). Dropout applies to the mechanism's output (there is
no attention matrix to drop from). The maths is in docs/approximate.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..approx import (ConvPool, FavorPositive, favor_projection, linear_attention, linformer_attention,
                      nystrom_attention, pooled_attention, synthesizer_attention)
from ..approx.feature_maps import FEATURE_MAPS
from ..approx.pooling import POOLS, resolve_pooler
from .core import Core, check_option

__all__ = ["LinearOptions", "PerformerOptions", "LinformerOptions", "NystromOptions", "SynthesizerOptions",
           "PooledOptions", "LinearCore", "PerformerCore", "LinformerCore", "NystromCore", "SynthesizerCore",
           "PooledCore"]


def _no_causal(name: str, causal: bool) -> None:
    if causal:
        raise ValueError(f"{name} has no causal form (it mixes every position before attending); "
                         f"use causal=False or a mechanism with causal support (memattn.mechanisms.catalog())")


# ----------------------------------------------------------------------------- linear
@dataclass(frozen=True)
class LinearOptions:
    """Kernel linear attention with a named feature map ("elu": elu+1, "relu")."""

    feature_map: str = "elu"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"option feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        check_option("eps", self.eps, (int, float), minimum=0.0)


class LinearCore(Core):
    def forward(self, q, k, v, *, key_mask, causal):
        out = linear_attention(q, k, v, feature_map=self.options.feature_map, causal=causal, eps=self.options.eps,
                               key_padding_mask=key_mask)
        return self.output_dropout(out)


# ----------------------------------------------------------------------------- performer
@dataclass(frozen=True)
class PerformerOptions:
    """FAVOR+ with ``num_features`` random features, redrawn every ``redraw_interval``
    training forwards (0: never); ``orthogonal`` blocks; draws seeded by ``seed``."""

    num_features: int = 256
    redraw_interval: int = 1000
    orthogonal: bool = True
    seed: int = 0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_option("num_features", self.num_features, int, minimum=1)
        check_option("redraw_interval", self.redraw_interval, int, minimum=0)
        check_option("orthogonal", self.orthogonal, bool)
        check_option("seed", self.seed, int, minimum=0)
        check_option("eps", self.eps, (int, float), minimum=0.0)


class PerformerCore(Core):
    """Holds the projection (a buffer, saved with the state dict) and the redraw schedule."""

    def __init__(self, spec, options: PerformerOptions) -> None:
        super().__init__(spec, options)
        self._generator = torch.Generator().manual_seed(options.seed)
        self.register_buffer("projection", self._draw())
        self.calls_since_redraw = 0
        self.redraws = 0

    def _draw(self) -> torch.Tensor:
        return favor_projection(self.spec.head_dim, self.options.num_features, orthogonal=self.options.orthogonal,
                                generator=self._generator)

    def redraw(self) -> None:
        """Draw a fresh projection now (the next draw of this layer's seeded generator)."""
        w = self._draw()
        self.projection.copy_(w.to(self.projection.dtype))
        self.calls_since_redraw = 0
        self.redraws += 1

    def step(self) -> None:
        if not self.training or self.options.redraw_interval == 0:
            return
        if self.calls_since_redraw >= self.options.redraw_interval:
            self.redraw()
        self.calls_since_redraw += 1

    def forward(self, q, k, v, *, key_mask, causal):
        fm = FavorPositive(self.projection.float())
        out = linear_attention(q, k, v, feature_map=fm, causal=causal, eps=self.options.eps, key_padding_mask=key_mask)
        return self.output_dropout(out)


# ----------------------------------------------------------------------------- linformer
@dataclass(frozen=True)
class LinformerOptions:
    """Keys and values projected from N to ``rank`` rows by learned E, F of length ``max_len``;
    ``per_head``: one E, F per kv head (else shared by the heads); ``share_kv``: F = E."""

    rank: int = 64
    max_len: int = 1024
    per_head: bool = False
    share_kv: bool = False

    def __post_init__(self) -> None:
        check_option("rank", self.rank, int, minimum=1)
        check_option("max_len", self.max_len, int, minimum=1)
        check_option("per_head", self.per_head, bool)
        check_option("share_kv", self.share_kv, bool)


class LinformerCore(Core):
    supports_causal: ClassVar[bool] = False

    def __init__(self, spec, options: LinformerOptions) -> None:
        super().__init__(spec, options)
        shape = ((spec.num_kv_heads,) if options.per_head else ()) + (options.rank, options.max_len)
        bound = 1.0 / math.sqrt(options.rank)
        self.proj_k = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.proj_v = None if options.share_kv else nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

    def forward(self, q, k, v, *, key_mask, causal):
        _no_causal("linformer", causal)
        n = k.shape[2]
        if n > self.options.max_len:
            raise ValueError(f"linformer: sequence length {n} exceeds the projection length max_len="
                             f"{self.options.max_len}; build the layer with a larger max_len")
        e = self.proj_k[..., :n].to(q.dtype)
        f = e if self.proj_v is None else self.proj_v[..., :n].to(q.dtype)
        return self.output_dropout(linformer_attention(q, k, v, proj_k=e, proj_v=f, key_padding_mask=key_mask))


# ----------------------------------------------------------------------------- nystrom
@dataclass(frozen=True)
class NystromOptions:
    """``num_landmarks`` segment-mean landmarks, ``pinv_iterations`` of the iterative
    pseudo-inverse; ``conv_kernel`` > 0 adds the depthwise-convolution residual on the
    values (kernel length along the sequence, 33 in the paper; 0: off)."""

    num_landmarks: int = 64
    pinv_iterations: int = 6
    conv_kernel: int = 0

    def __post_init__(self) -> None:
        check_option("num_landmarks", self.num_landmarks, int, minimum=1)
        check_option("pinv_iterations", self.pinv_iterations, int, minimum=0)
        check_option("conv_kernel", self.conv_kernel, int, minimum=0)


class NystromCore(Core):
    supports_causal: ClassVar[bool] = False

    def __init__(self, spec, options: NystromOptions) -> None:
        super().__init__(spec, options)
        self.conv = None
        if options.conv_kernel > 0:
            h, ck = spec.num_heads, options.conv_kernel
            self.conv = nn.Conv2d(h, h, (ck, 1), padding=(ck // 2, 0), groups=h, bias=False)

    def forward(self, q, k, v, *, key_mask, causal):
        _no_causal("nystrom", causal)
        o = self.options
        qmask = key_mask if (key_mask is not None and q.shape[2] == k.shape[2]) else None
        out = nystrom_attention(q, k, v, num_landmarks=o.num_landmarks, pinv_iterations=o.pinv_iterations,
                                key_padding_mask=key_mask, query_padding_mask=qmask)
        if self.conv is not None:
            if q.shape[2] != k.shape[2]:
                raise ValueError("nystrom's convolution residual needs as many queries as keys (no KV cache)")
            vv = v if key_mask is None else v * key_mask[:, None, :, None].to(v.dtype)
            g = q.shape[1] // k.shape[1]
            vv = vv.repeat_interleave(g, 1) if g > 1 else vv
            res = self.conv(vv)
            out = out + res[:, :, : q.shape[2]]
        return self.output_dropout(out)


# ----------------------------------------------------------------------------- synthesizer
_SYNTH_KINDS = ("dense", "random", "factorized")


@dataclass(frozen=True)
class SynthesizerOptions:
    """Synthesised scores over ``max_len`` positions. ``kind``: "dense" (a per-head MLP of
    the query scores every position), "random" (a (max_len, max_len) matrix per head,
    learned, or fixed when ``learned`` is False) or "factorized" (low-rank random R₁R₂ᵀ of
    rank ``factors``); ``mix``: add dot-product scores, weighted by learned per-head weights."""

    kind: str = "dense"
    max_len: int = 512
    learned: bool = True
    factors: int = 8
    mix: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _SYNTH_KINDS:
            raise ValueError(f"option kind must be one of {_SYNTH_KINDS}, got {self.kind!r}")
        check_option("max_len", self.max_len, int, minimum=1)
        check_option("learned", self.learned, bool)
        check_option("factors", self.factors, int, minimum=1)
        check_option("mix", self.mix, bool)


class SynthesizerCore(Core):
    def __init__(self, spec, options: SynthesizerOptions) -> None:
        super().__init__(spec, options)
        H, D, L = spec.num_heads, spec.head_dim, options.max_len
        if options.kind == "dense":
            self.w1 = nn.Parameter(torch.randn(H, D, D) / math.sqrt(D))
            self.b1 = nn.Parameter(torch.zeros(H, 1, D))
            self.w2 = nn.Parameter(torch.randn(H, D, L) / math.sqrt(D))
            self.b2 = nn.Parameter(torch.zeros(H, 1, L))
        elif options.kind == "random":
            r = torch.randn(H, L, L)
            if options.learned:
                self.r = nn.Parameter(r)
            else:
                self.register_buffer("r", r)
        else:
            self.r1 = nn.Parameter(torch.randn(H, L, options.factors) / options.factors ** 0.25)
            self.r2 = nn.Parameter(torch.randn(H, L, options.factors) / options.factors ** 0.25)
        self.mix_logits = nn.Parameter(torch.zeros(H, 2)) if options.mix else None

    @property
    def needs_queries(self) -> bool:
        return self.options.kind == "dense" or self.options.mix

    @property
    def needs_keys(self) -> bool:
        return self.options.mix

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B or 1, Hq, Nq, Nk) synthesised scores; query i sits at position i + Nk − Nq."""
        nq, nk = q.shape[2], k.shape[2]
        if nk > self.options.max_len:
            raise ValueError(f"synthesizer: sequence length {nk} exceeds max_len={self.options.max_len}; "
                             f"build the layer with a larger max_len")
        kind = self.options.kind
        if kind == "dense":
            h = torch.relu(torch.matmul(q, self.w1.to(q.dtype)) + self.b1.to(q.dtype))      # [B,H,Nq,D]
            s = torch.matmul(h, self.w2[..., :nk].to(q.dtype)) + self.b2[..., :nk].to(q.dtype)
        elif kind == "random":
            s = self.r[:, nk - nq:nk, :nk].to(q.dtype).unsqueeze(0)
        else:
            s = torch.matmul(self.r1[:, nk - nq:nk].to(q.dtype), self.r2[:, :nk].to(q.dtype).transpose(-1, -2))
            s = s.unsqueeze(0)
        if self.mix_logits is not None:
            w = torch.softmax(self.mix_logits, -1).to(q.dtype)
            g = q.shape[1] // k.shape[1]
            kk = k.repeat_interleave(g, 1) if g > 1 else k
            dot = torch.matmul(q, kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
            s = w[:, 0, None, None] * s + w[:, 1, None, None] * dot
        return s

    def forward(self, q, k, v, *, key_mask, causal):
        out = synthesizer_attention(self.scores(q, k), v, causal=causal, key_padding_mask=key_mask)
        return self.output_dropout(out)


# ----------------------------------------------------------------------------- pooling
_POOL_NAMES = tuple(sorted(POOLS)) + ("conv",)


@dataclass(frozen=True)
class PooledOptions:
    """Keys/values pooled by ``pool`` ("avg", "max", "adaptive", or "conv": a learned depthwise
    strided convolution, initialised to the average) over windows of ``stride``
    (``target_len`` windows for "adaptive"); ``pool_queries`` pools queries too (Funnel; the
    output is repeated back to every position; non-causal)."""

    pool: str = "avg"
    stride: int = 2
    pool_queries: bool = False
    target_len: int = 64

    def __post_init__(self) -> None:
        if self.pool not in _POOL_NAMES:
            raise ValueError(f"option pool must be one of {_POOL_NAMES}, got {self.pool!r}")
        check_option("stride", self.stride, int, minimum=1)
        check_option("pool_queries", self.pool_queries, bool)
        check_option("target_len", self.target_len, int, minimum=1)


class PooledCore(Core):
    def __init__(self, spec, options: PooledOptions) -> None:
        super().__init__(spec, options)
        D, s = spec.head_dim, options.stride
        if options.pool == "conv":
            self.conv_k = nn.Parameter(torch.full((D, s), 1.0 / s))
            self.conv_v = nn.Parameter(torch.full((D, s), 1.0 / s))
            self.bias_k = nn.Parameter(torch.zeros(D))
            self.bias_v = nn.Parameter(torch.zeros(D))

    def _poolers(self):
        o = self.options
        if o.pool == "conv":
            return ConvPool(self.conv_k, self.bias_k), ConvPool(self.conv_v, self.bias_v)
        p = resolve_pooler(o.pool, o.stride, o.target_len)
        return p, p

    def forward(self, q, k, v, *, key_mask, causal):
        o = self.options
        pk, pv = self._poolers()
        if o.pool_queries:
            if causal:
                raise ValueError("pooled with pool_queries=True has no causal form (a pooled query mixes "
                                 "future positions)")
            if q.shape[2] != k.shape[2]:
                raise ValueError("pool_queries needs as many queries as keys (no KV cache)")
        qmask = key_mask if o.pool_queries else None
        out = pooled_attention(q, k, v, pool=pk, pool_v=pv, pool_queries=o.pool_queries, causal=causal,
                               key_padding_mask=key_mask, query_padding_mask=qmask)
        if o.pool_queries:                  # back to one row per position: the window holding it
            n = q.shape[2]
            _, end = pk.windows(n)
            idx = torch.searchsorted(end.to(q.device), torch.arange(n, device=q.device), right=True)
            out = out[:, :, idx]
        return self.output_dropout(out)
