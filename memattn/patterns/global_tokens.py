"""Global tokens: chosen positions attend to every key and are attended by every query."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch

from .base import Pattern, block_bounds
from .blockmap import BlockCOO, _cdiv
from ._tiles import Runs, tile_bounds

__all__ = ["GlobalTokens", "global_tokens", "global_coo", "as_positions"]


def as_positions(indices: Iterable[int], name: str, allow_empty: bool = False) -> tuple[int, ...]:
    """Validate absolute positions: non-negative ints; returned sorted and unique."""
    if isinstance(indices, torch.Tensor):
        indices = indices.reshape(-1).tolist()
    try:
        vals = list(indices)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(indices).__name__}") from None
    for v in vals:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must hold non-negative ints (absolute positions), got {v!r}")
    if not vals and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return tuple(sorted(set(vals)))


@functools.lru_cache(maxsize=32)
def _runs(indices: tuple[int, ...]) -> Runs:
    return Runs(indices)


def _is_global(indices: tuple[int, ...], pos: torch.Tensor) -> torch.Tensor:
    pos = torch.as_tensor(pos)
    if not indices:
        return torch.zeros(pos.shape, dtype=torch.bool, device=pos.device)
    return torch.isin(pos, torch.tensor(indices, dtype=torch.int64, device=pos.device))


def global_coo(heads: int, nq: int, nk: int, block_q: int, block_k: int, indices: tuple[int, ...],
               band: BlockCOO | None, half: torch.Tensor) -> BlockCOO:
    """Block map of ``|q - k| <= half[h]`` (the tiles of ``band``) or q or k global, with exact
    fullness: a tile is full iff its non-global queries Q' and keys K' satisfy
    Q' or K' empty, or max(max Q' - min K', max K' - min Q') <= half[h] (half = -1: no band)."""
    qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
    runs = _runs(indices)
    parts = [] if band is None else [band]
    qf, ql = block_bounds(nq, block_q, nk - nq)
    kf, kl = block_bounds(nk, block_k)
    g_rows = torch.nonzero(runs.any_in(qf, ql)).flatten()
    g_cols = torch.nonzero(runs.any_in(kf, kl)).flatten()
    h = torch.arange(heads, dtype=torch.int64)
    if g_rows.numel():
        t = g_rows.repeat_interleave(kb_n).repeat(heads)
        u = torch.arange(kb_n, dtype=torch.int64).repeat(g_rows.numel() * heads)
        hh = h.repeat_interleave(g_rows.numel() * kb_n)
        parts.append(BlockCOO.from_entries(heads, qb_n, kb_n, hh, t, u, torch.zeros_like(t, dtype=torch.bool)))
    if g_cols.numel():
        t = torch.arange(qb_n, dtype=torch.int64).repeat_interleave(g_cols.numel()).repeat(heads)
        u = g_cols.repeat(qb_n * heads)
        hh = h.repeat_interleave(qb_n * g_cols.numel())
        parts.append(BlockCOO.from_entries(heads, qb_n, kb_n, hh, t, u, torch.zeros_like(t, dtype=torch.bool)))
    if not parts:
        return BlockCOO.empty(heads, qb_n, kb_n)
    coo = parts[0]
    for p in parts[1:]:
        coo = coo.union(p)
    head, qf_e, ql_e, kf_e, kl_e = tile_bounds(coo, nq, nk, block_q, block_k)
    qa, qz = runs.first_free(qf_e), runs.last_free(ql_e)
    ka, kz = runs.first_free(kf_e), runs.last_free(kl_e)
    no_q, no_k = qa > ql_e, ka > kl_e
    reach = torch.maximum(qz - ka, kz - qa)
    full = no_q | no_k | (reach <= half[head])
    return coo.select(torch.ones_like(full), full)


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """``q_pos`` or ``kv_pos`` is one of ``indices`` (absolute positions)."""

    indices: tuple[int, ...]

    def mask(self, b, h, q_pos, kv_pos):
        return _is_global(self.indices, q_pos) | _is_global(self.indices, kv_pos)

    def _coo(self, nq, nk, block_q, block_k):
        return global_coo(1, nq, nk, block_q, block_k, self.indices, None, torch.tensor([-1]))

    def __repr__(self) -> str:
        return f"global_tokens({_short(self.indices)})"


def _short(indices: tuple[int, ...]) -> str:
    if len(indices) <= 8:
        return f"({', '.join(map(str, indices))})" if len(indices) != 1 else f"({indices[0]},)"
    return f"({indices[0]}, {indices[1]}, …, {indices[-1]}: {len(indices)} positions)"


def global_tokens(indices: Iterable[int]) -> Pattern:
    """Global tokens attend to every key and are attended by every query.

    Allowed iff ``q_pos in indices`` or ``kv_pos in indices`` (absolute positions; indices
    beyond the problem are simply absent). Usually combined: ``sliding_window(w) |
    global_tokens([0])``.

    Args:
        indices: non-negative ints, at least one (any order; duplicates are ignored).
    Returns:
        a :class:`GlobalTokens` pattern.

    Example:
        >>> from memattn import patterns
        >>> patterns.global_tokens([0]).dense(3, 3).int().tolist()
        [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    """
    return GlobalTokens(as_positions(indices, "indices"))
