"""Input checks shared by memattn.attention and the approximate mechanisms."""

from __future__ import annotations

import torch

__all__ = ["check_qkv_layout", "check_accumulate_into"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check the (B, H, N, D) layout of design.md §3 (GQA allowed); raise naming the argument.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), one dtype and device, Hq % Hkv == 0.

    Example:
        >>> import torch
        >>> check_qkv_layout(torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 9, 16), torch.zeros(1, 2, 9, 8))
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k's head dim {k.shape[3]} differs from q's {D}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) for GQA/MQA")
    if Nq == 0 or k.shape[2] == 0 or D == 0 or v.shape[3] == 0:
        raise ValueError(f"empty dimension: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def check_accumulate_into(grads: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Check ``accumulate_into`` of an attention backward: three tensors (dq, dk, dv) shaped
    like q, k, v, in their dtype and on their device; raise naming the argument.

    Example:
        >>> import torch
        >>> q = torch.zeros(1, 2, 8, 4)
        >>> check_accumulate_into(tuple(torch.zeros_like(q) for _ in range(3)), q, q, q)
    """
    if not isinstance(grads, (tuple, list)) or len(grads) != 3:
        raise TypeError(f"accumulate_into must be a tuple (dq, dk, dv), got {type(grads).__name__}")
    for name, g, t in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"accumulate_into's {name} must be a torch.Tensor, got {type(g).__name__}")
        if g.shape != t.shape or g.dtype != t.dtype or g.device != t.device:
            raise ValueError(f"accumulate_into's {name} must be {tuple(t.shape)} {t.dtype} on {t.device}, got "
                             f"{tuple(g.shape)} {g.dtype} on {g.device}")
        if torch.compiler.is_compiling():     # traced: storages are unknown; the compiled form
            continue                          # computes the gradients before it adds them
        for other, x in (("q", q), ("k", k), ("v", v)):
            if g.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                raise ValueError(f"accumulate_into's {name} shares memory with {other}: the backward reads {other} "
                                 f"while it writes {name}")
