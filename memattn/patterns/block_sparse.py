"""Block-sparse pattern given by an explicit block layout."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .base import Pattern
from ._tiles import coarsen_blocks, fdiv

__all__ = ["BlockSparse", "block_sparse"]


@functools.lru_cache(maxsize=16)
def _unpack(shape: tuple[int, ...], bits: bytes) -> torch.Tensor:
    n = int(np.prod(shape))
    flat = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool)
    return torch.from_numpy(flat.reshape(shape).copy())


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """Allowed iff ``layout[h][q_pos // block_size, kv_pos // block_size]``.

    The layout is stored packed (``shape`` and ``bits``) so the pattern stays hashable.
    Positions outside the layout (negative, or beyond its rows/columns) are not allowed by
    ``mask``; ``dense``/``block_map`` raise a ValueError naming nk when nk positions do
    not fit in the layout."""

    shape: tuple[int, ...]          # (QB, KB) or (H, QB, KB)
    bits: bytes
    block_size: int

    @property
    def layout(self) -> torch.Tensor:
        """bool (H or 1, QB, KB) layout."""
        t = _unpack(self.shape, self.bits)
        return t if t.dim() == 3 else t[None]

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return self.shape[0] if len(self.shape) == 3 else None

    def for_sizes(self, nq: int, nk: int) -> Pattern:
        qbl, kbl = self.shape[-2:]
        if nk > kbl * self.block_size or nk > qbl * self.block_size:
            raise ValueError(f"nk={nk} does not fit a layout of {qbl} x {kbl} blocks of {self.block_size} "
                             f"(positions up to {min(qbl, kbl) * self.block_size})")
        return self

    def mask(self, b, h, q_pos, kv_pos):
        q_pos, kv_pos = torch.broadcast_tensors(torch.as_tensor(q_pos), torch.as_tensor(kv_pos))
        lay = self.layout.to(q_pos.device)          # positions on the GPU: look up there
        _, qbl, kbl = lay.shape
        qb, kb = fdiv(q_pos, self.block_size), fdiv(kv_pos, self.block_size)
        ok = (qb >= 0) & (qb < qbl) & (kb >= 0) & (kb < kbl)
        hh = (torch.as_tensor(h, dtype=torch.int64, device=q_pos.device) if lay.shape[0] > 1
              else torch.zeros((), dtype=torch.int64, device=q_pos.device))
        hh, qb, kb = torch.broadcast_tensors(hh, qb.clamp(0, qbl - 1), kb.clamp(0, kbl - 1))
        return lay[hh, qb, kb] & ok

    def _coo(self, nq, nk, block_q, block_k):
        self.for_sizes(nq, nk)
        hh, qb, kb = torch.nonzero(self.layout, as_tuple=True)
        return coarsen_blocks(self.heads, nq, nk, block_q, block_k, self.block_size, hh, qb, kb)

    def __repr__(self) -> str:
        lay = self.layout
        shape = "x".join(map(str, self.shape))
        return f"block_sparse(layout={shape} with {int(lay.sum())} blocks, block_size={self.block_size})"


def block_sparse(layout: torch.Tensor, block_size: int) -> Pattern:
    """Attend where an explicit block layout says so.

    Allowed iff ``layout[q_pos // block_size, kv_pos // block_size]`` (or
    ``layout[h, ...]`` for a per-head layout). The layout covers absolute positions
    [0, QB·block_size) for queries and [0, KB·block_size) for keys; a problem with nk beyond
    raises ValueError.

    Args:
        layout: bool (QB, KB), or (H, QB, KB) for one layout per head (any 0/1 dtype).
        block_size: positions per layout block (int >= 1), independent of kernel tiles.
    Returns:
        a :class:`BlockSparse` pattern (hashable: the layout is stored packed).

    Example:
        >>> import torch
        >>> from memattn import patterns
        >>> p = patterns.block_sparse(torch.tensor([[1, 0], [1, 1]]), block_size=2)
        >>> p.dense(4, 4).int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    """
    if not isinstance(layout, (torch.Tensor, np.ndarray, list, tuple)):
        raise TypeError(f"layout must be a tensor, got {type(layout).__name__}")
    t = torch.as_tensor(layout)
    if t.dim() not in (2, 3):
        raise ValueError(f"layout must have 2 dims (QB, KB) or 3 (H, QB, KB), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"layout must not be empty, got shape {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("layout must be bool or hold only 0 and 1")
        t = t.to(torch.bool)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    bits = np.packbits(t.detach().cpu().numpy().reshape(-1)).tobytes()
    return BlockSparse(tuple(t.shape), bits, block_size)
