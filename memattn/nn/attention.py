"""``memattn.nn.Attention``: one multi-head attention layer for every mechanism of the catalogue."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..mechanisms import catalog
from .core import Core, LayerSpec
from .kv_cache import KVCache

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head attention (projections, a mechanism core, output projection).

    Args:
        embed_dim: model width E.
        num_heads: query heads H (E % H == 0; head dim D = E / H).
        num_kv_heads: key/value heads (GQA/MQA; H % num_kv_heads == 0), default H.
        mechanism: a name in :func:`memattn.mechanisms.catalog` ("exact", "window", "bigbird",
            "linear", "performer", "linformer", "nystrom", "synthesizer", "pooled", …).
        dropout: attention-weight dropout for exact mechanisms, output dropout for approximate ones.
        checkpoint: recompute the mechanism in the backward instead of keeping its
            activations (torch.utils.checkpoint, non-reentrant).
        bias: biases in the projections.
        **mechanism_options: the mechanism's options (``catalog()[name].params`` lists them
            with their defaults), e.g. ``window=128``, ``num_features=256``, ``rank=64``.

    Example:
        >>> import torch
        >>> layer = Attention(64, 4, mechanism="performer", num_features=128)
        >>> x = torch.randn(2, 100, 64)
        >>> mask = torch.ones(2, 100, dtype=torch.bool); mask[1, 80:] = False
        >>> layer(x, attention_mask=mask, causal=True).shape
        torch.Size([2, 100, 64])
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None, mechanism: str = "exact",
                 dropout: float = 0.0, checkpoint: bool = False, bias: bool = True, **mechanism_options) -> None:
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or num_heads % kv:
            raise ValueError(f"num_kv_heads must be a positive divisor of num_heads ({num_heads}), got {num_kv_heads!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(checkpoint, bool):
            raise TypeError(f"checkpoint must be a bool, got {type(checkpoint).__name__}")
        cat = catalog()
        if mechanism not in cat:
            raise ValueError(f"mechanism must be one of {sorted(cat)}, got {mechanism!r}")
        self.info = cat[mechanism]
        allowed = {f.name for f in dataclasses.fields(self.info.options)}
        unknown = sorted(set(mechanism_options) - allowed)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for mechanism {mechanism!r}; its options are "
                             f"{self.info.params}")
        options = self.info.options(**mechanism_options)
        head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, kv, head_dim
        self.mechanism = mechanism
        self.checkpoint = checkpoint
        self.core: Core = self.info.core(LayerSpec(embed_dim, num_heads, kv, head_dim, float(dropout)), options)
        # mechanisms that never read q or k (Synthesizer's random kinds) get no projection for it
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias) if self.core.needs_queries else None
        self.k_proj = nn.Linear(embed_dim, kv * head_dim, bias=bias) if self.core.needs_keys else None
        self.v_proj = nn.Linear(embed_dim, kv * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor, *, attention_mask: torch.Tensor | None = None, causal: bool = False,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Attend over x.

        Args:
            x: (B, N, embed_dim).
            attention_mask: (B, Nk) with True/1 for a real token, False/0 for padding (HF
                convention); Nk = N, or the cache length after this step with ``kv_cache``.
                Padded keys are never attended; outputs at padded queries are unspecified.
            causal: keys at positions <= the query's (bottom-right aligned: with a cache, the
                N new tokens are the last N positions).
            kv_cache: a :class:`KVCache`; this step's keys/values are appended and the queries
                attend to everything cached.
        Returns:
            (B, N, embed_dim).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, N, {self.embed_dim}), got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if causal and not self.info.causal:
            raise ValueError(f"mechanism {self.mechanism!r} has no causal form; mechanisms with one: "
                             f"{sorted(n for n, i in catalog().items() if i.causal)}")
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a memattn.nn.KVCache, got {type(kv_cache).__name__}")
        B, N, _ = x.shape
        q = self._project(self.q_proj, x, self.num_heads)
        k = self._project(self.k_proj, x, self.num_kv_heads)
        v = self._project(self.v_proj, x, self.num_kv_heads)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        key_mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, k.shape[2]):
                raise ValueError(f"attention_mask must be a (B, Nk) = {(B, k.shape[2])} tensor, got "
                                 f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
            key_mask = attention_mask.to(device=x.device, dtype=torch.bool)
        self.core.step()
        if self.checkpoint and torch.is_grad_enabled():
            out = _checkpoint(self._attend, q, k, v, key_mask, causal, use_reentrant=False)
        else:
            out = self._attend(q, k, v, key_mask, causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))

    def _project(self, proj: nn.Linear | None, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, N, E) -> (B, heads, N, D) view; (B, heads, N, 0) when the mechanism reads no such input."""
        B, N, _ = x.shape
        if proj is None:
            return x.new_zeros(B, heads, N, 0)
        return proj(x).view(B, N, heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, key_mask, causal):
        return self.core(q, k, v, key_mask=key_mask, causal=causal)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"mechanism={self.mechanism!r}, checkpoint={self.checkpoint}")
