"""What the drop-in evaluation compares: patterns and training-free mechanisms, as data.

A :class:`Variant` is one row of the drop-in tables: SDPA (the peer), memattn exact, an
exact pattern (intersected with the model's own causal or padding mask), or an approximate
mechanism that reuses the pretrained q, k, v. ``register(causal)`` puts it in transformers
under a name of its own; ``decode_state`` says how much a decoder must keep per layer to
generate the next token at length N (the memory a pattern or a mechanism really saves).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import patterns as P
from ..patterns import Pattern

__all__ = ["Variant", "LayerShape", "DROPIN", "QUICK_DROPIN", "by_name"]


@dataclass(frozen=True)
class LayerShape:
    """Attention shape of one layer: query heads, key/value heads, head dims."""

    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int

    def __post_init__(self) -> None:
        for name in ("heads", "kv_heads", "head_dim", "value_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def _window(w: int) -> Callable[[bool], Pattern]:
    """w keys per query: the w most recent (causal), or w centred on the query."""

    def build(causal: bool) -> Pattern:
        return P.sliding_window(w - 1) if causal else P.sliding_window(w // 2, w - w // 2 - 1)

    return build


def _window_sinks(w: int, sinks: int) -> Callable[[bool], Pattern]:
    def build(causal: bool) -> Pattern:
        return _window(w)(causal) | P.global_tokens(range(sinks))

    return build


@dataclass(frozen=True)
class Variant:
    """One row of the drop-in tables.

    Attributes:
        name: row label.
        kind: "sdpa" (the peer), "exact", "pattern" or "approx".
        mechanism: memattn mechanism for ``register``.
        options: the mechanism's options.
        pattern: causal (bool) → Pattern, for kind "pattern".
        keys: causal decode, N → keys a decoder must keep per KV head (patterns; None: all N).
        description: what it is, in words.
    """

    name: str
    kind: str
    mechanism: str = "exact"
    options: tuple[tuple[str, Any], ...] = ()
    pattern: Callable[[bool], Pattern] | None = field(default=None, compare=False)
    keys: Callable[[int], int] | None = field(default=None, compare=False)
    description: str = ""

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    def supports(self, causal: bool) -> bool:
        """Whether the variant can serve a causal (decoder) or a bidirectional model."""
        if self.kind != "approx" or not causal:
            return True
        from ..integrations.transformers import _CAUSAL_CAPABLE

        return self.mechanism in _CAUSAL_CAPABLE

    def register(self, causal: bool, backend: str = "auto") -> str:
        """Register in transformers; returns the ``attn_implementation`` name ("sdpa" for the peer)."""
        if self.kind == "sdpa":
            return "sdpa"
        from ..integrations.transformers import register

        name = f"memattn-eval-{self.slug}-{'c' if causal else 'b'}"
        pat = self.pattern(causal) if self.pattern is not None else None
        return register(name, pattern=pat, mechanism=self.mechanism, backend=backend, **dict(self.options))

    def decode_state(self, shape: LayerShape, n: int) -> int | None:
        """Elements a causal decoder keeps per layer and sequence to generate token n + 1
        (keys and values of the cache, or a recurrent state); None when not causal."""
        if not self.supports(True):
            return None
        kv, d, dv = shape.kv_heads, shape.head_dim, shape.value_dim
        opts = dict(self.options)
        if self.kind in ("sdpa", "exact", "pattern"):
            keys = n if self.keys is None else min(n, self.keys(n))
            return kv * keys * (d + dv)
        if self.mechanism == "linear":
            return kv * (d * dv + d)  # Σ φ(k) vᵀ and Σ φ(k), elu+1 has F = D
        if self.mechanism == "performer":
            m = int(opts.get("num_features", 256))
            return kv * (m * dv + m)
        if self.mechanism == "pooled":
            s = int(opts.get("stride", 2))
            return kv * (math.ceil(n / s) + s) * (d + dv)  # pooled windows + the open window
        return None


def _v(name: str, kind: str, **kw: Any) -> Variant:
    return Variant(name, kind, **kw)


DROPIN: tuple[Variant, ...] = (
    _v("SDPA", "sdpa", description="torch scaled_dot_product_attention (transformers' default)"),
    _v("exact", "exact", description="memattn exact attention with the model's own mask"),
    _v("window 64", "pattern", pattern=_window(64), keys=lambda n: 64,
       description="64 keys per query (the latest 64 in a decoder, centred in an encoder)"),
    _v("window 256", "pattern", pattern=_window(256), keys=lambda n: 256, description="256 keys per query"),
    _v("window 1024", "pattern", pattern=_window(1024), keys=lambda n: 1024, description="1024 keys per query"),
    _v("window 64 + 4 sinks", "pattern", pattern=_window_sinks(64, 4), keys=lambda n: 68,
       description="window 64 plus the first 4 tokens as global sinks (StreamingLLM)"),
    _v("window 256 + 4 sinks", "pattern", pattern=_window_sinks(256, 4), keys=lambda n: 260,
       description="window 256 plus 4 sinks"),
    _v("Longformer", "pattern", pattern=lambda causal: P.longformer(256, (0,)), keys=lambda n: 129 + 1,
       description="longformer(window=256, global_indices=(0,)): ±128 keys plus global token 0"),
    _v("BigBird", "pattern", pattern=lambda causal: P.bigbird(64, 3, 2, 3), keys=None,
       description="bigbird(block 64, 3 window blocks, 2 global blocks, 3 random blocks)"),
    _v("strided", "pattern", pattern=lambda causal: P.strided(64, local=64), keys=None,
       description="Sparse Transformer strided: |i-j| <= 64 or |i-j| % 64 == 0"),
    _v("Performer 64", "approx", mechanism="performer", options=(("num_features", 64),),
       description="FAVOR+ with 64 orthogonal random features"),
    _v("Performer 256", "approx", mechanism="performer", options=(("num_features", 256),),
       description="FAVOR+ with 256 features"),
    _v("Performer 1024", "approx", mechanism="performer", options=(("num_features", 1024),),
       description="FAVOR+ with 1024 features"),
    _v("linear elu", "approx", mechanism="linear", options=(("feature_map", "elu"),),
       description="kernel linear attention, φ = elu + 1"),
    _v("Nyström 64", "approx", mechanism="nystrom", options=(("num_landmarks", 64),),
       description="Nyström with 64 segment-mean landmarks (not causal)"),
    _v("pooled avg 4", "approx", mechanism="pooled", options=(("pool", "avg"), ("stride", 4)),
       description="keys/values average-pooled over windows of 4 (causal-safe form in a decoder)"),
)

QUICK_DROPIN: tuple[str, ...] = ("SDPA", "exact", "window 64", "window 256", "window 64 + 4 sinks", "linear elu",
                                 "Performer 256")


def by_name(names: tuple[str, ...] | list[str]) -> tuple[Variant, ...]:
    """The variants of :data:`DROPIN` with these names (ValueError on an unknown one)."""
    table = {v.name: v for v in DROPIN}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(table)}")
    return tuple(table[n] for n in names)
