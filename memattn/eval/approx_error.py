"""Approximation error on real attention inputs.

The queries, keys and values of chosen layers are captured from a real model
(:func:`memattn.eval.dropin.capture_layers`); each variant's output on those inputs is
compared with exact softmax attention under the model's own mask computed in float64 on
the CPU (the oracle). The figure is the relative Frobenius error over real query rows,
``‖o − o*‖ / ‖o*‖``, per layer.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .dropin import Capture, run_attention
from .variants import Variant

__all__ = ["reference_output", "relative_error", "layer_errors"]


def reference_output(cap: Capture) -> torch.Tensor:
    """Exact attention with the model's mask, float64 on the CPU → (B, Hq, N, Dv)."""
    from .. import attention

    q, k, v = (t.detach().to("cpu", torch.float64) for t in (cap.q, cap.k, cap.v))
    pattern = cap.mask.pattern_for(None) if cap.mask is not None else None
    if pattern is not None:
        pattern = pattern.for_sizes(q.shape[2], k.shape[2])
    return attention(q, k, v, pattern=pattern, scale=cap.scaling, backend="cpu")


def relative_error(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """‖out − ref‖_F / ‖ref‖_F over the query rows where ``rows`` (B, N) is True.

    Example:
        >>> relative_error(torch.ones(1, 1, 2, 2) * 1.1, torch.ones(1, 1, 2, 2))
        0.1...
    """
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if rows is not None:
        sel = rows[:, None, :, None].to("cpu")
        o, r = o * sel, r * sel
    return float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-300))


def layer_errors(variants: Iterable[Variant], captures: list[Capture], causal: bool,
                 progress: Callable[[], None] | None = None) -> dict[str, list[float | None]]:
    """Relative error of every variant at every captured layer (None where a variant cannot run).

    Args:
        variants: the rows.
        captures: from :func:`memattn.eval.dropin.capture_layers`.
        causal: the model is a decoder.
        progress: called after each (variant, layer).
    Returns:
        variant name → errors in capture order.
    """
    refs = [reference_output(c) for c in captures]
    rows = []
    for c in captures:
        kv = None if c.mask is None else c.mask.key_valid
        rows.append(kv if kv is not None and c.q.shape[2] == c.k.shape[2] else None)
    out: dict[str, list[float | None]] = {}
    for var in variants:
        errs: list[float | None] = []
        for c, ref, row in zip(captures, refs, rows):
            if not var.supports(causal):
                errs.append(None)
            else:
                errs.append(relative_error(run_attention(var, c, causal), ref, row))
            if progress is not None:
                progress()
        out[var.name] = errs
    return out
