"""Custom ops (``torch.library.triton_op``) and their autograd.

``memattn::triton_attn_fwd`` and ``memattn::triton_attn_bwd`` wrap the launchers with
``wrap_triton`` so that ``torch.compile`` traces the kernel launches without a graph break;
the forward op's autograd formula calls the backward op. Mask tensors travel as optional
tensor arguments (a :class:`~.launch.MaskArgs` flattened).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from . import launch
from .masks import MaskSpec

__all__ = ["attention", "attention_backward", "mask_args"]


def mask_args(spec: MaskSpec) -> launch.MaskArgs:
    """The kernel-facing tensors of a mask description."""
    tag = spec.info.get("tag", "")
    if spec.is_param:
        return launch.MaskArgs(window=spec.window, doc_id=spec.doc_id, doc_range=spec.doc_range,
                               doc_pmin=spec.doc_pmin, tag=tag)
    return launch.MaskArgs(fwd=spec.fwd, bwd=spec.bwd, bits=spec.bits, map_bm=spec.map_block[0],
                           map_bn=spec.map_block[1], map_heads=spec.map_heads, tag=tag)


def _unflat(window: Optional[Tensor], doc_id: Optional[Tensor], doc_range: Optional[Tensor],
            f0: Optional[Tensor], f1: Optional[Tensor], f2: Optional[Tensor], f3: Optional[Tensor],
            f4: Optional[Tensor], b0: Optional[Tensor], b1: Optional[Tensor], b2: Optional[Tensor],
            b3: Optional[Tensor], b4: Optional[Tensor], bits: Optional[Tensor], doc_pmin: int, map_bm: int,
            map_bn: int, map_heads: int, tag: str) -> launch.MaskArgs:
    return launch.MaskArgs(window=window, doc_id=doc_id, doc_range=doc_range, fwd=(f0, f1, f2, f3, f4),
                           bwd=(b0, b1, b2, b3, b4), bits=bits, doc_pmin=doc_pmin, map_bm=map_bm, map_bn=map_bn,
                           map_heads=map_heads, tag=tag)


def _flat(m: launch.MaskArgs) -> tuple:
    return (m.window, m.doc_id, m.doc_range, *m.fwd, *m.bwd, m.bits, m.doc_pmin, m.map_bm, m.map_bn,
            m.map_heads, m.tag)


@triton_op("memattn::triton_attn_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, window: Optional[Tensor], doc_id: Optional[Tensor],
            doc_range: Optional[Tensor], f0: Optional[Tensor], f1: Optional[Tensor], f2: Optional[Tensor],
            f3: Optional[Tensor], f4: Optional[Tensor], b0: Optional[Tensor], b1: Optional[Tensor],
            b2: Optional[Tensor], b3: Optional[Tensor], b4: Optional[Tensor], bits: Optional[Tensor],
            doc_pmin: int, map_bm: int, map_bn: int, map_heads: int, tag: str, scale: float, softcap: float,
            dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    m = _unflat(window, doc_id, doc_range, f0, f1, f2, f3, f4, b0, b1, b2, b3, b4, bits, doc_pmin, map_bm, map_bn,
                map_heads, tag)
    return launch.forward(q, k, v, m, scale=scale, softcap=softcap, dropout_p=dropout_p, seed=seed)


@triton_op("memattn::triton_attn_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, dlse: Optional[Tensor],
            window: Optional[Tensor], doc_id: Optional[Tensor], doc_range: Optional[Tensor], f0: Optional[Tensor],
            f1: Optional[Tensor], f2: Optional[Tensor], f3: Optional[Tensor], f4: Optional[Tensor],
            b0: Optional[Tensor], b1: Optional[Tensor], b2: Optional[Tensor], b3: Optional[Tensor],
            b4: Optional[Tensor], bits: Optional[Tensor], doc_pmin: int, map_bm: int, map_bn: int, map_heads: int,
            tag: str, scale: float, softcap: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    m = _unflat(window, doc_id, doc_range, f0, f1, f2, f3, f4, b0, b1, b2, b3, b4, bits, doc_pmin, map_bm, map_bn,
                map_heads, tag)
    return launch.backward(q, k, v, out, dout, lse, m, scale=scale, softcap=softcap, dropout_p=dropout_p,
                           seed=seed, dlse=dlse)


_N_MASK_T = 14   # tensors among the flattened mask arguments


def _setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs[:3]
    mask_t = inputs[3:3 + _N_MASK_T]
    ctx.scalars = inputs[3 + _N_MASK_T:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *mask_t)


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse, *mask_t = ctx.saved_tensors
    n_in = 3 + _N_MASK_T + len(ctx.scalars)
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(q, k, v, out, dout, lse, dlse, *mask_t, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (n_in - 3)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, m: launch.MaskArgs, *, scale: float, softcap: float = 0.0,
              dropout_p: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Differentiable attention through the custom op: (out, lse)."""
    return _fwd_op(q, k, v, *_flat(m), float(scale), float(softcap), float(dropout_p), int(seed))


def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, m: launch.MaskArgs,
                       *, scale: float, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the final out / lse (no dropout), through the backward op."""
    return _bwd_op(q, k, v, out, dout, lse, None, *_flat(m), float(scale), float(softcap), 0.0, 0)
