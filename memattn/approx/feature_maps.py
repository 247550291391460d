"""Feature maps φ of kernel linear attention: small typed objects, looked up by name.

A feature map turns a query or key row x (length D) into a non-negative feature row φ(x)
(length F), so that softmax-like weights are replaced by φ(q)·φ(k). Each map is a frozen
dataclass with ``__call__(x, *, is_query, key_shift=None)``; parameter-free maps are
registered by name in :data:`FEATURE_MAPS` (``"elu"``, ``"relu"``), and FAVOR+ is built
from a projection (:class:`FavorPositive`). :func:`resolve_feature_map` accepts a name or
an instance.

Stabilisers: FAVOR+ features are exponentials, so :meth:`FeatureMap.scaled` returns them
shifted, φ(x)·exp(−c), together with the shift c: a query's own row max, and one max over
all keys of a (batch, head). Linear attention scales its ``eps`` by exp(−c_q − c_k), so the
result is exactly that of the unshifted formula (the shifts are numerical devices only: the
output does not depend on them, in particular not on future keys through the key max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

__all__ = ["FeatureMap", "EluPlusOne", "Relu", "FavorPositive", "FEATURE_MAPS", "resolve_feature_map"]

# Rows of keys evaluated at once when computing a global key shift (bounds transient memory).
_SHIFT_CHUNK = 4096


class FeatureMap:
    """Base class: φ applied to the last axis, (..., N, D) -> (..., N, F)."""

    name: ClassVar[str] = "feature_map"

    def num_features(self, head_dim: int) -> int:
        """F, the feature count for head dimension D."""
        return head_dim

    def key_shift(self, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """A detached constant per leading index (e.g. per batch and head) subtracted inside
        φ(k) for stability, computed over all real keys (``key_mask`` broadcastable to
        k.shape[:-1], True = real); None when the map needs none."""
        return None

    def __call__(self, x: torch.Tensor, *, is_query: bool, key_shift: torch.Tensor | None = None) -> torch.Tensor:
        """φ(x) (shifted by exp(−c) for maps that stabilise, see :meth:`scaled`)."""
        raise NotImplementedError

    def scaled(self, x: torch.Tensor, *, is_query: bool,
               key_shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(φ(x)·exp(−c), c): the features and the detached shift c (per row for a query,
        ``key_shift`` for a key), or (φ(x), None) for maps that need no shift."""
        return self(x, is_query=is_query, key_shift=key_shift), None


@dataclass(frozen=True)
class EluPlusOne(FeatureMap):
    """φ(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, F = D.

    Example:
        >>> EluPlusOne()(torch.tensor([[-1.0, 0.0, 2.0]]), is_query=True)
        tensor([[0.3679, 1.0000, 3.0000]])
    """

    name: ClassVar[str] = "elu"

    def __call__(self, x, *, is_query, key_shift=None):
        return F.elu(x) + 1.0

    def __repr__(self) -> str:
        return "EluPlusOne()"


@dataclass(frozen=True)
class Relu(FeatureMap):
    """φ(x) = max(x, 0): non-negative, F = D; a row may be all zero (``eps`` then matters).

    Example:
        >>> Relu()(torch.tensor([[-1.0, 2.0]]), is_query=False)
        tensor([[0., 2.]])
    """

    name: ClassVar[str] = "relu"

    def __call__(self, x, *, is_query, key_shift=None):
        return F.relu(x)

    def __repr__(self) -> str:
        return "Relu()"


@dataclass(frozen=True, eq=False)
class FavorPositive(FeatureMap):
    """FAVOR+ positive random features (Choromanski et al., 2021).

    With x̂ = x · D^(-1/4) (so that E[φ(q)·φ(k)] = exp(q·k / √D), the softmax kernel) and
    projection W (m, D): φ(x) = exp(W x̂ − |x̂|²/2) / √m. Computed shifted, exp(… − c), with
    c the row max of W x̂ − |x̂|²/2 for a query and one max over all keys of a (batch, head)
    for a key (:meth:`scaled` returns c too).

    Args:
        projection: (m, D) random directions, e.g. from :func:`memattn.approx.favor_projection`.
    Example:
        >>> from memattn.approx import favor_projection
        >>> fm = FavorPositive(favor_projection(16, 64, generator=torch.Generator().manual_seed(0)))
        >>> fm(torch.randn(2, 3, 16), is_query=True).shape
        torch.Size([2, 3, 64])
    """

    projection: torch.Tensor
    name: ClassVar[str] = "favor"

    def __post_init__(self) -> None:
        if not isinstance(self.projection, torch.Tensor) or self.projection.dim() != 2:
            raise ValueError("projection must be a (num_features, head_dim) tensor, got "
                             f"{getattr(self.projection, 'shape', type(self.projection).__name__)}")

    def num_features(self, head_dim: int) -> int:
        if head_dim != self.projection.shape[1]:
            raise ValueError(f"projection has head_dim {self.projection.shape[1]}, inputs have {head_dim}")
        return self.projection.shape[0]

    def _exponent(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        if d != self.projection.shape[1]:
            raise ValueError(f"projection has head_dim {self.projection.shape[1]}, inputs have {d}")
        xh = x * d ** -0.25
        w = self.projection.to(device=x.device, dtype=x.dtype)
        return torch.matmul(xh, w.transpose(0, 1)) - 0.5 * (xh * xh).sum(-1, keepdim=True)

    def key_shift(self, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """max over real positions and features of the exponent, per leading index:
        shape k.shape[:-2] + (1, 1); 0 where a (batch, head) has no real key."""
        with torch.no_grad():
            n = k.shape[-2]
            best = None
            for s in range(0, n, _SHIFT_CHUNK):
                e = self._exponent(k[..., s:s + _SHIFT_CHUNK, :])
                if key_mask is not None:
                    km = torch.broadcast_to(key_mask, k.shape[:-1])[..., s:s + _SHIFT_CHUNK, None]
                    e = e.masked_fill(~km, float("-inf"))
                m = e.amax(dim=(-2, -1), keepdim=True)
                best = m if best is None else torch.maximum(best, m)
            return torch.where(torch.isfinite(best), best, torch.zeros_like(best))

    def scaled(self, x, *, is_query, key_shift=None):
        e = self._exponent(x)
        if is_query:
            shift = e.amax(dim=-1, keepdim=True).detach()
        else:
            shift = key_shift if key_shift is not None else e.amax(dim=(-2, -1), keepdim=True).detach()
        return torch.exp(e - shift) * (1.0 / math.sqrt(self.projection.shape[0])), shift

    def __call__(self, x, *, is_query, key_shift=None):
        return self.scaled(x, is_query=is_query, key_shift=key_shift)[0]

    def __repr__(self) -> str:
        return f"FavorPositive(num_features={self.projection.shape[0]}, head_dim={self.projection.shape[1]})"


# Parameter-free maps by name.
FEATURE_MAPS: dict[str, Callable[[], FeatureMap]] = {
    EluPlusOne.name: EluPlusOne,
    Relu.name: Relu,
}


def resolve_feature_map(feature_map: str | FeatureMap) -> FeatureMap:
    """A :class:`FeatureMap` from a registered name or an instance.

    Example:
        >>> resolve_feature_map("elu")
        EluPlusOne()
    """
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        try:
            return FEATURE_MAPS[feature_map]()
        except KeyError:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a FeatureMap, "
                             f"got {feature_map!r}") from None
    raise TypeError(f"feature_map must be a str or a FeatureMap, got {type(feature_map).__name__}")
