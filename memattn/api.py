"""memattn.attention: validate, resolve the backend, dispatch. No maths here."""

from __future__ import annotations

import importlib
import sys
from typing import Literal, overload

import torch

from ._checks import check_accumulate_into, check_qkv_layout
from .patterns import Pattern, causal as _causal_pattern

__all__ = ["attention", "BACKENDS", "validate_inputs"]

# name -> module implementing ``attention(q, k, v, *, pattern, scale, softcap, dropout_p,
# dropout_seed, return_lse)`` on validated inputs.
BACKENDS: dict[str, str] = {
    "reference": "memattn.backends.reference",
    "cpu": "memattn.backends.cpu",
    "triton": "memattn.backends.triton",
}


def validate_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    softcap: float = 0.0, dropout_p: float = 0.0) -> float:
    """Check the (B, H, N, D) contract of design.md §3; return the resolved scale.

    Raises TypeError/ValueError naming the offending argument."""
    check_qkv_layout(q, k, v)
    D = q.shape[3]
    if scale is None:
        scale = D ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"softcap must be >= 0, got {softcap!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return float(scale)


def _backend_module(name: str):
    """The backend's module: a ``sys.modules`` lookup once imported (torch.compile traces that;
    ``importlib.import_module`` is a graph break), imported on first use."""
    mod = sys.modules.get(BACKENDS[name])
    return mod if mod is not None else importlib.import_module(BACKENDS[name])


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda else "cpu"
    return backend


@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None = ..., causal: bool = ...,
              scale: float | None = ..., softcap: float = ..., dropout_p: float = ..., backend: str = ...,
              return_lse: Literal[False] = ...) -> torch.Tensor: ...
@overload
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None = ..., causal: bool = ...,
              scale: float | None = ..., softcap: float = ..., dropout_p: float = ..., backend: str = ...,
              return_lse: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...


def attention(q, k, v, *, pattern=None, causal=False, scale=None, softcap=0.0, dropout_p=0.0,
              backend="auto", return_lse=False):
    """Exact softmax attention in O(N) memory, dense or restricted to a pattern.

    ``out[b, h, i] = sum_j softmax_j(s_ij) v[b, h // g, j]`` with
    ``s_ij = scale · q[b, h, i] · k[b, h // g, j]`` (``softcap · tanh(s / softcap)`` when
    softcap > 0), over the keys j the pattern allows; g = Hq // Hkv (GQA/MQA, no copy).

    Args:
        q: (B, Hq, Nq, D) queries. Any strides.
        k: (B, Hkv, Nk, D) keys, Hq % Hkv == 0.
        v: (B, Hkv, Nk, Dv) values.
        pattern: a :class:`memattn.patterns.Pattern`, or None for all pairs.
        causal: keep keys at positions <= the query's (queries sit at i + Nk - Nq,
            bottom-right alignment). With ``pattern``: their intersection.
        scale: score scale, default D ** -0.5.
        softcap: > 0 applies ``softcap · tanh(s / softcap)`` to scores.
        dropout_p: probability of dropping an attention weight (training).
        backend: "auto" (Triton on CUDA, else cpu), "triton", "cpu" or "reference".
            A named backend that cannot serve the call raises; it never falls back.
        return_lse: also return the float32 (B, Hq, Nq) log-sum-exp of the scores
            (natural log; -inf for a row with no allowed key, whose output is 0).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) when return_lse.

    Example:
        >>> import torch, memattn
        >>> q, k, v = (torch.randn(2, 8, 1000, 64) for _ in range(3))
        >>> out = memattn.attention(q, k, v, causal=True)
        >>> out.shape
        torch.Size([2, 8, 1000, 64])
        >>> w = memattn.patterns.sliding_window(128)
        >>> out, lse = memattn.attention(q, k, v, pattern=w, return_lse=True)
    """
    scale = validate_inputs(q, k, v, scale=scale, softcap=softcap, dropout_p=dropout_p)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a memattn.patterns.Pattern or None, got {type(pattern).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if pattern is not None and pattern.num_heads not in (None, q.shape[1]):
        raise ValueError(f"pattern varies over {pattern.num_heads} heads but q has {q.shape[1]}")
    if causal:
        pattern = _causal_pattern() if pattern is None else pattern & _causal_pattern()
    if pattern is not None:  # bind size-dependent patterns (random, bigbird); check fixed extents
        pattern = pattern.for_sizes(q.shape[2], k.shape[2])
    name = _resolve_backend(backend, q)
    module = _backend_module(name)
    seed = 0
    if dropout_p > 0:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    out, lse = module.attention(q, k, v, pattern=pattern, scale=scale, softcap=float(softcap),
                                dropout_p=float(dropout_p), dropout_seed=seed)
    return (out, lse) if return_lse else out


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                       lse: torch.Tensor, *, pattern: Pattern | None = None, causal: bool = False,
                       scale: float | None = None, softcap: float = 0.0, backend: str = "auto",
                       accumulate_into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention given the *final* output and lse (FlashAttention-2 backward).

    A building block for attention split over key blocks (ring attention): ``out`` and
    ``lse`` may come from merging several partial results; the gradients returned are
    those of this (q, k, v) block's contribution, so that summing dq over blocks and
    routing dk/dv back to their owners gives the gradients of the whole.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv).
        out: (B, Hq, Nq, Dv) the final output; dout: its gradient, same shape.
        lse: float32 (B, Hq, Nq), the final log-sum-exp (natural log).
        pattern, causal, scale, softcap, backend: as in :func:`attention` (no dropout).
        accumulate_into: optional (dq, dk, dv) shaped like q, k, v, in their dtype and on
            their device (any strides; views such as row slices of larger buffers too). The
            gradients are added to them in place, and they are returned. The Triton backend
            adds inside its kernels, so no gradient-sized temporaries are allocated (what
            ring attention's backward uses); the other backends compute and then add.
    Returns:
        dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv), in the inputs' dtype
        (``accumulate_into`` itself when given).

    Example:
        >>> import torch, memattn
        >>> q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
        >>> out, lse = memattn.attention(q, k, v, return_lse=True)
        >>> dq, dk, dv = attention_backward(q, k, v, out, torch.ones_like(out), lse)
    """
    scale = validate_inputs(q, k, v, scale=scale, softcap=softcap)
    if out.shape != q.shape[:3] + v.shape[3:] or dout.shape != out.shape:
        raise ValueError(f"out and dout must have shape {tuple(q.shape[:3] + v.shape[3:])}, "
                         f"got {tuple(out.shape)} and {tuple(dout.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    if causal:
        pattern = _causal_pattern() if pattern is None else pattern & _causal_pattern()
    if pattern is not None:  # bind size-dependent patterns (random, bigbird); check fixed extents
        pattern = pattern.for_sizes(q.shape[2], k.shape[2])
    module = _backend_module(_resolve_backend(backend, q))
    if accumulate_into is None:
        return module.attention_backward(q, k, v, out, dout, lse, pattern=pattern, scale=scale,
                                         softcap=float(softcap))
    check_accumulate_into(accumulate_into, q, k, v)
    if getattr(module.attention_backward, "accumulates", False):
        return module.attention_backward(q, k, v, out, dout, lse, pattern=pattern, scale=scale,
                                         softcap=float(softcap), accumulate_into=tuple(accumulate_into))
    grads = module.attention_backward(q, k, v, out, dout, lse, pattern=pattern, scale=scale, softcap=float(softcap))
    for acc, g in zip(accumulate_into, grads):
        acc.add_(g)
    return tuple(accumulate_into)

