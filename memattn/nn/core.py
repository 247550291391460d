"""The base of every mechanism core used by :class:`memattn.nn.Attention`.

A core maps per-head q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D) to (B, Hq, Nq, D); it owns
the mechanism's parameters (e.g. Linformer's projections) and is built from a
:class:`LayerSpec` and the mechanism's typed options dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

__all__ = ["LayerSpec", "Core", "check_option"]


@dataclass(frozen=True)
class LayerSpec:
    """Shapes shared by every core of a layer."""

    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dropout: float


def check_option(name: str, value: object, kind: type | tuple[type, ...], *, minimum: float | None = None) -> None:
    """Raise TypeError/ValueError naming the option when ``value`` is not of ``kind`` or below ``minimum``."""
    if isinstance(value, bool) and kind is not bool and (not isinstance(kind, tuple) or bool not in kind):
        raise TypeError(f"option {name} must be {getattr(kind, '__name__', kind)}, got bool")
    if not isinstance(value, kind):
        raise TypeError(f"option {name} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ValueError(f"option {name} must be >= {minimum}, got {value!r}")


class Core(nn.Module):
    """Base class of a mechanism core.

    Class flags: ``supports_causal`` (the mechanism has a causal form), ``supports_kv_cache``
    (queries may be fewer than keys, bottom-right aligned, as when decoding with a cache)."""

    supports_causal: ClassVar[bool] = True
    supports_kv_cache: ClassVar[bool] = True

    def __init__(self, spec: LayerSpec, options: object) -> None:
        super().__init__()
        self.spec = spec
        self.options = options

    @property
    def needs_queries(self) -> bool:
        """False when the mechanism never reads q (the layer then has no query projection
        and passes a zero-width (B, H, N, 0) tensor that only carries the shape)."""
        return True

    @property
    def needs_keys(self) -> bool:
        """False when the mechanism never reads k (as above, for the key projection)."""
        return True

    def step(self) -> None:
        """Called once per layer forward before the (possibly checkpointed) core runs, in
        training and eval mode; cores with a schedule (Performer's redraws) act here."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        raise NotImplementedError

    def output_dropout(self, out: torch.Tensor) -> torch.Tensor:
        """Dropout on the mechanism's output (approximate mechanisms have no weight matrix to drop)."""
        p = self.spec.dropout
        return torch.nn.functional.dropout(out, p=p, training=True) if (p > 0 and self.training) else out

    def extra_repr(self) -> str:
        return repr(self.options)
