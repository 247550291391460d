"""Full, causal and sliding-window patterns (contiguous key ranges per query)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, block_bounds
from .blockmap import BlockCOO, _cdiv

__all__ = ["Full", "SlidingWindow", "full", "causal", "sliding_window"]

_BIG = 1 << 62  # "unbounded" window side


def _as_per_head(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, ...] | int:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} must not be empty")
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must hold non-negative ints, got {value!r}")
        return tuple(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or a per-head sequence, got {value!r}")
    return value


def _head_values(value: int | tuple[int, ...], h: torch.Tensor | int) -> torch.Tensor:
    if isinstance(value, tuple):
        return torch.tensor(value, dtype=torch.int64)[torch.as_tensor(h, dtype=torch.int64)]
    return torch.tensor(value, dtype=torch.int64)


@dataclass(frozen=True)
class Full(Pattern):
    """Every pair allowed."""

    def mask(self, b, h, q_pos, kv_pos):
        return torch.ones(torch.broadcast_shapes(q_pos.shape, kv_pos.shape), dtype=torch.bool,
                          device=torch.as_tensor(q_pos).device)

    def _coo(self, nq, nk, block_q, block_k):
        qb, kb = _cdiv(nq, block_q), _cdiv(nk, block_k)
        z = torch.zeros(qb, dtype=torch.int64)
        return BlockCOO.from_ranges(1, qb, kb, z, z + kb, z, z + kb)

    _restrictable = True

    def _nnz_hint(self, nq, nk, block_q, block_k):
        return _cdiv(nq, block_q) * _cdiv(nk, block_k)

    def _restrict(self, coo, nq, nk, block_q, block_k):
        return coo

    def __repr__(self) -> str:
        return "full()"


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Keys with ``q_pos - left <= kv_pos <= q_pos + right`` (both inclusive).

    ``left``/``right`` may be per-head tuples. ``causal()`` is ``SlidingWindow(∞, 0)``.
    """

    left: int | tuple[int, ...]
    right: int | tuple[int, ...] = 0

    def __post_init__(self) -> None:
        if isinstance(self.left, tuple) and isinstance(self.right, tuple) and len(self.left) != len(self.right):
            raise ValueError(f"left and right give different head counts ({len(self.left)} vs {len(self.right)})")

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        for v in (self.left, self.right):
            if isinstance(v, tuple):
                return len(v)
        return None

    def mask(self, b, h, q_pos, kv_pos):
        # b, h, q_pos, kv_pos broadcast together (e.g. h of shape (1, H, 1, 1)).
        d = q_pos - kv_pos
        return (d <= _head_values(self.left, h)) & (-d <= _head_values(self.right, h))

    def _head_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.heads
        left = _head_values(self.left, torch.arange(heads)).reshape(-1, 1).expand(heads, 1)
        right = _head_values(self.right, torch.arange(heads)).reshape(-1, 1).expand(heads, 1)
        return left, right

    def _ranges(self, nq: int, nk: int, block_q: int, block_k: int) -> tuple[torch.Tensor, ...]:
        """Per (head, query block): key blocks [lo, hi) and full ones [f_lo, f_hi)."""
        kb_n = _cdiv(nk, block_k)
        q_first, q_last = block_bounds(nq, block_q, nk - nq)
        left, right = self._head_bounds()
        # allowed keys of the block: [q_first - left, q_last + right]; of every row: [q_last - left, q_first + right]
        k_lo = torch.clamp(q_first[None] - left, min=0)
        k_hi = torch.clamp(q_last[None] + right, max=nk - 1)
        lo = torch.div(k_lo, block_k, rounding_mode="floor")
        hi = torch.where(k_hi >= k_lo, torch.div(k_hi, block_k, rounding_mode="floor") + 1, lo)
        f_lo_pos = torch.clamp(q_last[None] - left, min=0)   # first key every row of the block allows
        f_hi_pos = torch.clamp(q_first[None] + right, max=nk - 1)
        f_lo = _cdiv_t(f_lo_pos, block_k)                       # first block starting at or after it
        # last block wholly inside [.., f_hi_pos]: its end (min(start+bk, nk)-1) <= f_hi_pos
        f_hi = torch.div(f_hi_pos + 1, block_k, rounding_mode="floor")
        f_hi = torch.where(f_hi_pos == nk - 1, torch.full_like(f_hi, kb_n), f_hi)
        f_hi = torch.where(f_hi_pos >= f_lo_pos, f_hi, f_lo)
        return lo, hi, f_lo, f_hi

    def _coo(self, nq, nk, block_q, block_k):
        lo, hi, f_lo, f_hi = self._ranges(nq, nk, block_q, block_k)
        return BlockCOO.from_ranges(self.heads, _cdiv(nq, block_q), _cdiv(nk, block_k), lo, hi, f_lo, f_hi)

    # cheap intersection: filter another map's tiles by their difference range
    _restrictable = True

    def _nnz_hint(self, nq, nk, block_q, block_k):
        lo, hi, _, _ = self._ranges(nq, nk, block_q, block_k)
        return int((hi - lo).clamp(min=0).sum())

    def _restrict(self, coo, nq, nk, block_q, block_k):
        coo = coo.broadcast_heads(max(coo.heads, self.heads))
        head, q = coo.entries()[:2]
        kb = coo.key % coo.num_kv_blocks
        off = nk - nq
        qf = q * block_q + off
        ql = torch.clamp((q + 1) * block_q, max=nq) - 1 + off
        kf = kb * block_k
        kl = torch.clamp(kf + block_k, max=nk) - 1
        left, right = self._head_bounds()
        hsel = head if self.heads > 1 else torch.zeros_like(head)
        lft, rgt = left[hsel, 0], right[hsel, 0]
        d_lo, d_hi = qf - kl, ql - kf           # every difference in between occurs in the tile
        keep = (d_hi >= -rgt) & (d_lo <= lft)
        full = coo.full & (d_lo >= -rgt) & (d_hi <= lft)
        return coo.select(keep, full)

    def __repr__(self) -> str:
        if self.left == _BIG and self.right == 0:
            return "causal()"
        return f"sliding_window(left={self.left}, right={self.right})"


def _cdiv_t(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def full() -> Pattern:
    """Every query attends to every key.

    Example:
        >>> from memattn import patterns
        >>> patterns.full().density(8, 8)
        1.0
    """
    return Full()


def causal() -> Pattern:
    """Key position <= query position (bottom-right aligned when nq != nk).

    Example:
        >>> from memattn import patterns
        >>> patterns.causal().density(4, 4)
        0.625
    """
    return SlidingWindow(_BIG, 0)


def sliding_window(left: int | tuple[int, ...], right: int | tuple[int, ...] = 0) -> Pattern:
    """Keys in ``[q_pos - left, q_pos + right]``, inclusive; per-head tuples allowed.

    Args:
        left: keys allowed before the query (int >= 0, or one int per head).
        right: keys allowed after the query (default 0: a causal window).
    Example:
        >>> from memattn import patterns
        >>> patterns.sliding_window(1).dense(4, 4).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    return SlidingWindow(_as_per_head(left, "left"), _as_per_head(right, "right"))
