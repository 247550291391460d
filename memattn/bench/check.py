"""The quick correctness check a case must pass before its speed is reported.

A slice is checked, not the whole output: batch 0, the query heads of kv head 0, and the
*last* ``rows`` query rows. Queries are bottom-right aligned (query i sits at
i + Nk − Nq), so the last r rows of a call keep their absolute positions when they are
recomputed alone against all keys; the first rows would not.

Exact implementations are judged as design.md §4: the oracle is the reference backend in
float64 on the slice; the implementation passes when its max error is at most twice the
error of a same-dtype naive attention (matmuls in the input dtype, softmax in float32,
as ``flash_attn``'s ``attention_ref(upcast=False)``) plus the rounding atol
``2·max|o + 0.3 − 0.3 − o|`` in that dtype; in float32/float64, where both errors are a
few ulps, at least the rounding of a sum of Nk terms, ``4·sqrt(Nk)·eps·max|o|``. Linear attention (elu+1) is compared with its
own closed form in float64; other approximations are only checked to be finite and of
the right shape (their error is what ``memattn eval`` measures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cases import Case

__all__ = ["CheckResult", "quick_check"]


@dataclass(frozen=True)
class CheckResult:
    """Outcome of :func:`quick_check`: ``passed``, the max error, the tolerance and how it was judged."""

    passed: bool
    err: float
    tol: float
    kind: str
    detail: str = ""


def _slice(case: Case, q, k, v, out, rows: int):
    g = case.heads // case.hkv
    r = min(rows, case.q_len)
    qs = q[:1, :g, -r:].detach()
    ks, vs = k[:1, :1].detach(), v[:1, :1].detach()
    return qs, ks, vs, out[:1, :g, -r:].detach()


def _pattern_with_causal(case: Case):
    from ..patterns import causal as causal_pattern

    pat = case.pattern_spec.build(case.n) if case.pattern_spec else None
    if case.causal and not case.is_decode:
        pat = causal_pattern() if pat is None else pat & causal_pattern()
    return pat


def _naive_same_dtype(q, k, v, pattern, scale):
    from ..backends.reference import dense_mask

    B, Hq, nq, _ = q.shape
    g = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    m = dense_mask(pattern, B, Hq, nq, k.shape[2], q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s.float(), dim=-1)
    p = torch.nan_to_num(p, nan=0.0).to(q.dtype)  # rows with no key: 0, as the contract says
    return torch.matmul(p, vv)


def _rounding_atol(o: torch.Tensor, dtype: torch.dtype) -> float:
    od = o.to(dtype)
    return 2.0 * float((od + 0.3 - 0.3 - od).abs().max())


def quick_check(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                kind: str = "reference", rows: int = 32) -> CheckResult:
    """Check a slice of an implementation's output.

    Args:
        case: the case that produced ``out``.
        q, k, v: its inputs, (B, Hq, Nq, D), (B, Hkv, N, D), (B, Hkv, N, Dv).
        out: its output (B, Hq, Nq, Dv).
        kind: "reference" (exact softmax attention), "linear-elu" or "finite".
        rows: how many of the last query rows to recompute.
    Returns:
        :class:`CheckResult`.

    Example:
        >>> from memattn.bench.peers import make_inputs
        >>> c = Case("naive", 64, d=16, heads=2, causal=True)
        >>> q, k, v = make_inputs(c)
        >>> import memattn
        >>> quick_check(c, q, k, v, memattn.attention(q, k, v, causal=True, backend="reference")).passed
        True
    """
    expected = (case.batch, case.heads, case.q_len, case.d)
    if tuple(out.shape) != expected:
        return CheckResult(False, float("nan"), 0.0, kind, f"output shape {tuple(out.shape)} != {expected}")
    qs, ks, vs, os_ = _slice(case, q, k, v, out, rows)
    if not bool(torch.isfinite(os_).all()):
        return CheckResult(False, float("nan"), 0.0, kind, "non-finite output")
    if kind == "finite":
        return CheckResult(True, 0.0, 0.0, kind, "approximate: finite and shaped only")
    q64, k64, v64 = qs.double(), ks.double(), vs.double()
    scale = case.d ** -0.5
    if kind == "linear-elu":
        fq = torch.nn.functional.elu(q64) + 1
        fk = torch.nn.functional.elu(k64) + 1
        a = torch.matmul(fq, fk.transpose(-1, -2))
        if case.causal and not case.is_decode:
            r, n = a.shape[-2], a.shape[-1]
            a = a * torch.ones(r, n, dtype=torch.bool, device=a.device).tril(diagonal=n - r)
        oracle = torch.matmul(a, v64) / a.sum(-1, keepdim=True)
        rel = 1e-3 if q.dtype in (torch.float32, torch.float64) else 3e-2
        tol = rel * (1.0 + float(oracle.abs().max()))
        err = float((os_.double() - oracle).abs().max())
        return CheckResult(err <= tol, err, tol, kind, "vs closed-form elu+1 linear attention (float64)")
    if kind != "reference":
        raise ValueError(f"kind must be 'reference', 'linear-elu' or 'finite', got {kind!r}")
    from ..backends import reference

    pat = _pattern_with_causal(case)
    oracle, _ = reference.attention(q64, k64, v64, pattern=pat, scale=scale)
    same = _naive_same_dtype(qs, ks, vs, pat, scale)
    err = float((os_.double() - oracle).abs().max())
    ref_err = float((same.double() - oracle).abs().max())
    tol = 2.0 * ref_err + _rounding_atol(oracle, q.dtype)
    if q.dtype in (torch.float32, torch.float64):
        # in single/double precision both errors are a few ulps and the 2x rule turns into
        # a coin toss between two correct summation orders: allow the random-walk rounding
        # of a sum over Nk terms, 4·sqrt(Nk)·eps·max|o| (still 1e3x below a real bug)
        tol = max(tol, 4.0 * math.sqrt(case.n) * torch.finfo(q.dtype).eps * float(oracle.abs().max()))
    return CheckResult(err <= tol, err, tol, kind,
                       f"last {qs.shape[2]} rows, {qs.shape[1]} head(s) vs float64 reference")
