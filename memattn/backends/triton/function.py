"""Custom ops (``torch.library.triton_op``) and their autograd.

``memattn::triton_attn_fwd`` and ``memattn::triton_attn_bwd`` wrap the launchers with
``wrap_triton`` so that ``torch.compile`` traces the kernel launches without a graph break;
the forward op's autograd formula calls the backward op. Mask tensors travel as optional
tensor arguments (a :class:`~.launch.MaskArgs` flattened).

Under the CPU interpreter (TRITON_INTERPRET=1) the interpreted launches cannot be traced into
a graph, so the ops are opaque ``torch.library.custom_op`` s instead: a compiled graph calls
them whole at run time, and their fake implementation is the same code, which under fake
tensors allocates the outputs and launches nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ..._checks import check_accumulate_into
from . import launch
from .masks import MaskSpec

__all__ = ["attention", "attention_backward", "mask_args"]


def mask_args(spec: MaskSpec) -> launch.MaskArgs:
    """The kernel-facing tensors of a mask description (one object per description, so the
    launchers' cached plans are found again)."""
    hit = spec.info.get("_mask_args")
    if hit is not None:
        return hit
    tag = spec.info.get("tag", "")
    if spec.is_param:
        m = launch.MaskArgs(window=spec.window, doc_id=spec.doc_id, doc_range=spec.doc_range,
                            doc_pmin=spec.doc_pmin, tag=tag)
    else:
        m = launch.MaskArgs(fwd=spec.fwd, bwd=spec.bwd, bits=spec.bits, map_bm=spec.map_block[0],
                            map_bn=spec.map_block[1], map_heads=spec.map_heads, tag=tag,
                            window=spec.window, doc_id=spec.doc_id, doc_pmin=spec.doc_pmin)
    if not torch.compiler.is_compiling():
        spec.info["_mask_args"] = m
    return m


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


def _op(name: str):
    """triton_op on a GPU; an opaque custom_op (fake = the same body) under the interpreter."""
    def wrap(fn):
        if not launch.is_interpreter():
            return triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op
    return wrap


@_op("memattn::triton_attn_fwd")
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, window: Optional[Tensor], doc_id: Optional[Tensor],
            doc_range: Optional[Tensor], f0: Optional[Tensor], f1: Optional[Tensor], f2: Optional[Tensor],
            f3: Optional[Tensor], f4: Optional[Tensor], b0: Optional[Tensor], b1: Optional[Tensor],
            b2: Optional[Tensor], b3: Optional[Tensor], b4: Optional[Tensor], bits: Optional[Tensor],
            doc_pmin: int, map_bm: int, map_bn: int, map_heads: int, tag: str, scale: float, softcap: float,
            dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    m = _unflat(window, doc_id, doc_range, f0, f1, f2, f3, f4, b0, b1, b2, b3, b4, bits, doc_pmin, map_bm, map_bn,
                map_heads, tag)
    return launch.forward(q, k, v, m, scale=scale, softcap=softcap, dropout_p=dropout_p, seed=seed)


@_op("memattn::triton_attn_bwd")
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


class _AttentionFn(torch.autograd.Function):
    """Eager path: the launchers called directly (a custom op's dispatch costs far more than a
    small kernel at N = 1k; torch.compile takes the custom ops instead, see :func:`attention`)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, m: launch.MaskArgs, scale: float, softcap: float,
                dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
        out, lse = launch.forward(q, k, v, m, scale=scale, softcap=softcap, dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.m, ctx.args = m, (scale, softcap, dropout_p, seed)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        scale, softcap, dropout_p, seed = ctx.args
        dq, dk, dv = launch.backward(q, k, v, out, dout, lse, ctx.m, scale=scale, softcap=softcap,
                                     dropout_p=dropout_p, seed=seed, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, m: launch.MaskArgs, *, scale: float, softcap: float = 0.0,
              dropout_p: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Differentiable attention: (out, lse). Eager calls run the autograd.Function; under
    torch.compile the custom op ``memattn::triton_attn_fwd`` (whose autograd calls
    ``memattn::triton_attn_bwd``) is traced instead. Both run the same launchers."""
    if torch.compiler.is_compiling():
        return _fwd_op(q, k, v, *_flat(m), float(scale), float(softcap), float(dropout_p), int(seed))
    return _AttentionFn.apply(q, k, v, m, float(scale), float(softcap), float(dropout_p), int(seed))


def attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, m: launch.MaskArgs,
                       *, scale: float, softcap: float = 0.0,
                       accumulate_into: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the final out / lse (no dropout); the backward op under torch.compile.
    ``accumulate_into``: add them to these tensors instead (in the kernels when eager; under
    torch.compile the functional op runs and the sums are added afterwards)."""
    if torch.compiler.is_compiling():
        grads = _bwd_op(q, k, v, out, dout, lse, None, *_flat(m), float(scale), float(softcap), 0.0, 0)
        if accumulate_into is None:
            return grads
        check_accumulate_into(accumulate_into, q, k, v)
        for acc, g in zip(accumulate_into, grads):
            acc.add_(g)
        return tuple(accumulate_into)
    return launch.backward(q, k, v, out, dout, lse, m, scale=scale, softcap=softcap, accumulate_into=accumulate_into)
