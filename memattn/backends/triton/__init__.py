"""The Triton backend: FlashAttention-2 style kernels, forward and backward, dense / causal /
every pattern, registered as custom ops so ``torch.compile`` traces them.

Nothing here imports triton or touches a GPU at import time; the kernels are imported on
the first call. Files: ``masks.py`` (pattern -> kernel mask description), ``forward.py`` and
``backward.py`` (kernels), ``decode.py`` (the split-KV merge), ``configs.py`` (tile
configs), ``args.py`` (the mask tensors a launch carries, argument checks, strides, scalars
and constexpr flags), ``launch.py`` (config choice, grids, the forward and backward
launchers and their knobs), ``plans.py`` (cached launch plans, direct launches),
``function.py`` (custom ops + autograd). Knobs: ``launch.set_autotune``,
``launch.set_backward`` (two-pass or atomic-dQ backward), ``launch.override_configs``.
"""

from __future__ import annotations

import torch

from ...patterns import Pattern

__all__ = ["attention", "attention_backward", "describe_mask"]


def _available(q: torch.Tensor) -> None:
    """Raise a clear error when this backend cannot serve tensors like ``q``."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a test dependency
        raise ValueError("backend='triton' needs the triton package (pip install memattn[triton])") from e
    if q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32, not float64 "
                        "(use backend='cpu' or 'reference')")
    from .launch import is_interpreter

    if not q.is_cuda and not is_interpreter():
        raise ValueError(f"backend='triton' needs CUDA tensors, got {q.device} "
                         "(set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)")


def describe_mask(pattern: Pattern | None, q: torch.Tensor, k: torch.Tensor, **kwargs):
    """The kernel-facing mask description (:class:`~.masks.MaskSpec`) of ``pattern`` for
    these inputs; cached. Keyword arguments go to :func:`.masks.describe`.

    Example:
        >>> import torch
        >>> from memattn import patterns
        >>> q = torch.zeros(1, 2, 300, 64)
        >>> describe_mask(patterns.causal(), q, q).path
        'param'
    """
    from .masks import describe, map_blocks_for

    kwargs.setdefault("map_blocks", map_blocks_for(q.device))
    return describe(pattern, q.shape[2], k.shape[2], q.shape[1], q.device, batch=q.shape[0], **kwargs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pattern: Pattern | None, scale: float,
              softcap: float = 0.0, dropout_p: float = 0.0, dropout_seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with the Triton kernels (differentiable; ``torch.compile`` friendly).

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); float16 / bfloat16 /
            float32 CUDA tensors (CPU with TRITON_INTERPRET=1), any strides, Hq % Hkv == 0,
            D, Dv <= 256.
        pattern: a Pattern (intersected with causal by the caller if wanted) or None.
        scale: score scale; softcap: > 0 caps scores with softcap·tanh(s / softcap).
        dropout_p, dropout_seed: dropout of the attention weights with the counter hash of
            ``memattn._dropout`` (the same pairs as every other backend).
    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, lse float32 (B, Hq, Nq) (natural log, -inf for a
        row without allowed keys, whose output is 0).

    Example:
        >>> import torch, memattn  # doctest: +SKIP
        >>> q = torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> out, lse = attention(q, q, q, pattern=memattn.patterns.causal(), scale=128 ** -0.5)  # doctest: +SKIP
    """
    _available(q)
    from .function import attention as _attn, mask_args

    spec = describe_mask(pattern, q, k)
    return _attn(q, k, v, mask_args(spec), scale=scale, softcap=softcap, dropout_p=dropout_p, seed=dropout_seed)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                       lse: torch.Tensor, *, pattern: Pattern | None, scale: float, softcap: float = 0.0,
                       accumulate_into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward from the final ``out`` / ``lse`` (no dropout).

    Args:
        q, k, v, pattern, scale, softcap: as :func:`attention`.
        out, dout: (B, Hq, Nq, Dv); lse: float32 (B, Hq, Nq), natural log.
        accumulate_into: optional (dq, dk, dv) shaped like q, k, v (same dtype and device,
            any strides, views too): the kernels add the gradients to them in place.
    Returns:
        dq, dk, dv shaped like q, k, v (``accumulate_into`` itself when given).

    Example:
        >>> out, lse = attention(q, k, v, pattern=None, scale=0.125)  # doctest: +SKIP
        >>> dq, dk, dv = attention_backward(q, k, v, out, torch.ones_like(out), lse,  # doctest: +SKIP
        ...                                 pattern=None, scale=0.125)
    """
    _available(q)
    from .function import attention_backward as _bwd, mask_args

    spec = describe_mask(pattern, q, k)
    return _bwd(q, k, v, out, dout, lse, mask_args(spec), scale=scale, softcap=softcap,
                accumulate_into=accumulate_into)


attention_backward.accumulates = True   # memattn.api.attention_backward passes accumulate_into through
