"""Counter-based dropout: the keep decision of pair (b, h, i, j) is a hash of (seed, b, h, i, j).

Every backend (reference, cpu, Triton) computes the same mask from the same seed, in any
tile order, without storing it: the backward regenerates it. The hash is a 32-bit
integer mixer (``lowbias32`` style) applied three times; the top 24 bits give a uniform
number u in [0, 1), and a pair is kept when u >= p.
"""

from __future__ import annotations

import torch

__all__ = ["keep_mask", "MIX_A", "MIX_B"]

MIX_A = 0x7FEB352D
MIX_B = 0x846CA68B
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * MIX_A) & _M32
    x = x ^ (x >> 15)
    x = (x * MIX_B) & _M32  # int64 product wraps; the low 32 bits are exact
    x = x ^ (x >> 16)
    return x


def keep_mask(seed: int, bh: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor, p: float) -> torch.Tensor:
    """bool mask, True where the pair is kept (broadcast of the index tensors).

    Args:
        seed: the call's dropout seed (a non-negative int < 2**31).
        bh: flattened batch-head index ``b * Hq + h`` (int64 tensor).
        q_idx, k_idx: query and key indices (not positions), int64 tensors.
        p: dropout probability in [0, 1).
    Example:
        >>> import torch
        >>> m = keep_mask(1, torch.tensor(0), torch.arange(4)[:, None], torch.arange(4)[None], 0.5)
        >>> m.shape
        torch.Size([4, 4])
    """
    x = _mix32(torch.as_tensor(bh, dtype=torch.int64) ^ (seed & 0x7FFFFFFF))
    x = _mix32(x ^ torch.as_tensor(q_idx, dtype=torch.int64))
    x = _mix32(x ^ torch.as_tensor(k_idx, dtype=torch.int64))
    u = (x >> 8).to(torch.float64) * (1.0 / (1 << 24))
    return u >= p
