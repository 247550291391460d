"""Timing and work counts (design.md §5).

* Time: ``triton.testing.do_bench`` (median) on CUDA; on the CPU the median of repeats,
  as many as fit in ``max_seconds`` (at least one, after a warm-up run elsewhere).
* FLOPs count only allowed pairs: forward 4·B·Hq·pairs·D, backward 2.5× that,
  forward+backward 3.5×. TFLOP/s = 1e12 FLOP/s.
* Decoding (Nq = 1) reports bandwidth: bytes of K and V read / forward time, TB/s = 1e12 B/s.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from .cases import Case

__all__ = ["allowed_pairs", "flops", "kv_bytes", "time_ms", "tflops", "fit_slope"]


def allowed_pairs(case: Case) -> float:
    """Allowed (query, key) pairs of one head (averaged over heads for per-head patterns).

    Causal counts bottom-right aligned pairs exactly; a pattern counts its density
    (intersected with causal when the case is causal).

    Example:
        >>> allowed_pairs(Case("naive", 4, causal=True))
        10.0
    """
    nq, nk = case.q_len, case.n
    causal = case.causal and not case.is_decode
    spec = case.pattern_spec
    if spec is None:
        if not causal:
            return float(nq * nk)
        return float(nq * (nk - nq + 1) + nq * (nq - 1) // 2)
    from ..patterns import causal as causal_pattern

    pat = spec.build(nk)
    if causal:
        pat = pat & causal_pattern()
    return pat.density(nq, nk) * nq * nk


def flops(case: Case, which: str = "fwd", pairs: float | None = None) -> float:
    """FLOPs of a pass: "fwd" 4·B·Hq·pairs·D, "bwd" 2.5×, "fwd+bwd" 3.5×.

    Example:
        >>> flops(Case("naive", 1024, d=64, heads=1))
        268435456.0
    """
    pairs = allowed_pairs(case) if pairs is None else pairs
    f = 4.0 * case.batch * case.heads * pairs * case.d
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    if which not in factor:
        raise ValueError(f"which must be one of {sorted(factor)}, got {which!r}")
    return f * factor[which]


def tflops(flop: float, ms: float | None) -> float | None:
    """TFLOP/s from FLOPs and milliseconds (None when ms is None or ≤ 0)."""
    if ms is None or ms <= 0:
        return None
    return flop / (ms * 1e-3) / 1e12


def kv_bytes(case: Case) -> int:
    """Bytes of K and V a decoding step reads: 2·B·Hkv·N·D·element size."""
    es = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    return 2 * case.batch * case.hkv * case.n * case.d * es


def time_ms(fn: Callable[[], object], device: str, *, max_seconds: float = 1.0, max_reps: int = 20,
            grad_to_none: Sequence[torch.Tensor] | None = None, samples: Sequence[float] = ()) -> float:
    """Median milliseconds of ``fn()``.

    Args:
        fn: the call to time (already warmed up once).
        device: "cuda" → ``triton.testing.do_bench(return_mode="median")``; "cpu" → median
            of up to ``max_reps`` calls, as many as fit in ``max_seconds`` (at least one).
        grad_to_none: tensors whose ``.grad`` is reset before every call (not timed).
        samples: CPU: times (ms) of warm calls already made (e.g. the one whose memory was
            measured); they count as repeats and against ``max_seconds``.
    Returns:
        float milliseconds.

    Example:
        >>> time_ms(lambda: sum(range(1000)), "cpu", max_seconds=0.01) > 0
        True
    """
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none or []),
                              return_mode="median"))
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    times: list[float] = list(samples)
    start = time.perf_counter() - sum(times) / 1e3
    while not times or (len(times) < max_reps and time.perf_counter() - start + times[-1] / 1e3 <= max_seconds):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x) (the exponent of y ∝ x^slope).

    Points with y ≤ 0 or missing are left out; None with fewer than two points.

    Example:
        >>> round(fit_slope([1, 2, 4], [3, 12, 48]), 6)
        2.0
    """
    import math

    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx
