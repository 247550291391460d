"""A simple key/value cache for incremental decoding with :class:`memattn.nn.Attention`."""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of one layer, appended step by step.

    With ``max_len`` the buffers (B, Hkv, max_len, D) are allocated on the first update and
    filled in place (views are returned; use under ``torch.no_grad()`` for decoding);
    without it the cache grows by concatenation (differentiable).

    Args:
        max_len: capacity in tokens, or None to grow.

    Example:
        >>> import torch
        >>> cache = KVCache(max_len=16)
        >>> k_all, v_all = cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
        >>> k_all, v_all = cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        >>> k_all.shape, len(cache)
        (torch.Size([1, 2, 6, 8]), 6)
    """

    def __init__(self, max_len: int | None = None) -> None:
        if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.max_len = max_len
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def length(self) -> int:
        """Tokens held."""
        return self._len

    def reset(self) -> None:
        """Forget every token (preallocated buffers are kept)."""
        self._len = 0
        if self.max_len is None:
            self._k = self._v = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k (B, Hkv, n, D) and v (B, Hkv, n, Dv); return all keys and values so far.

        Returns:
            (k_all, v_all) of shapes (B, Hkv, length, D) and (B, Hkv, length, Dv).
        """
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a (B, Hkv, n, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k and v must share (B, Hkv, n), got {tuple(k.shape)} and {tuple(v.shape)}")
        n = k.shape[2]
        if self._k is not None and (self._k.shape[:2] != k.shape[:2] or self._k.shape[3] != k.shape[3]
                                    or self._v.shape[3] != v.shape[3]):
            raise ValueError(f"cache holds (B, Hkv, ·, D) = {tuple(self._k.shape[:2])} / {self._k.shape[3]}, "
                             f"got k {tuple(k.shape)}")
        if self.max_len is None:
            if self._k is None:
                self._k, self._v = k, v
            else:
                self._k, self._v = torch.cat([self._k, k], 2), torch.cat([self._v, v], 2)
            self._len += n
            return self._k, self._v
        if self._len + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self._len} + {n} tokens exceed max_len={self.max_len}")
        if self._k is None:
            B, H, _, D = k.shape
            self._k = k.new_empty(B, H, self.max_len, D)
            self._v = v.new_empty(B, H, self.max_len, v.shape[3])
        self._k[:, :, self._len:self._len + n] = k
        self._v[:, :, self._len:self._len + n] = v
        self._len += n
        return self._k[:, :, :self._len], self._v[:, :, :self._len]
