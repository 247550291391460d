"""The FlashAttention error rule (design.md §4), shared by every backend's tests.

A kernel's result passes when

    max |out − oracle| ≤ mult · max |ref − oracle| + 2 · max |ref + 0.3 − 0.3 − ref|

where ``oracle`` is the reference backend in float64, ``ref`` the reference backend in the
kernel's dtype (same inputs), ``mult`` 2 for outputs and lse, 3 for gradients. The last term
is the rounding granularity of the dtype around the values (the arithmetic is done in
``ref``'s dtype), so exact-but-reordered sums pass.

The rule is statistical: give it tensors with more than a handful of elements. For values
above ~0.3 (lse) the rounding term is often 0, and on a tensor of two or three elements the
reference can round exactly like the oracle by luck, leaving a bound of 0.

Use :func:`check_close` for one tensor, :func:`check_attention` for a whole call (out, lse,
dq, dk, dv). Both raise AssertionError with the three numbers in the message.

Example (in a test):
    >>> from _errors import check_attention   # tests/ is on sys.path under pytest
    >>> q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    >>> errs = check_attention(q, k, v, backend="cpu", causal=True)
"""

from __future__ import annotations

from typing import Any

import torch

import memattn

__all__ = ["rounding_atol", "check_close", "check_attention", "run_attention", "OUT_MULT", "GRAD_MULT"]

OUT_MULT = 2.0
GRAD_MULT = 3.0


def rounding_atol(ref: torch.Tensor) -> float:
    """2 · max |ref + 0.3 − 0.3 − ref| over the finite entries, computed in ref's dtype."""
    r = ref.detach()
    finite = torch.isfinite(r)
    if not bool(finite.any()):
        return 0.0
    r = r[finite]
    return 2.0 * float((r + 0.3 - 0.3 - r).abs().max().to(torch.float64))


def lse_floor(oracle: torch.Tensor) -> float:
    """Rounding floor for the float32 lse: 8 float32 ulps of its largest finite value.

    The rule's rounding term ``|ref + 0.3 − 0.3 − ref|`` is 0 for most float32 values above
    0.3, and the same-dtype reference's lse is the oracle's rounded to float32 (error often 0),
    so without a floor any reordering of the float32 sums (one ulp) would fail."""
    x = oracle.detach()
    x = x[torch.isfinite(x)]
    top = float(x.abs().max()) if x.numel() else 0.0
    return 8.0 * torch.finfo(torch.float32).eps * max(1.0, top)


def check_close(out: torch.Tensor, out_ref: torch.Tensor, out_oracle: torch.Tensor, mult: float = OUT_MULT,
                name: str = "out", min_atol: float = 0.0) -> dict[str, float]:
    """Assert the FlashAttention rule for one tensor; return the numbers.

    Args:
        out: the kernel's result (any float dtype).
        out_ref: the same-dtype reference's result, same shape.
        out_oracle: the float64 oracle's result, same shape.
        mult: allowed multiple of the reference's error (2 outputs, 3 gradients).
        name: what is checked, for the message.
        min_atol: a floor for the rounding term (``lse_floor`` for the float32 lse).
    Returns:
        {"err": kernel error, "ref_err": reference error, "atol": rounding term, "bound": allowed}.

    Infinite oracle entries (lse = -inf for a row with no allowed key) must be matched
    exactly by ``out``; NaN anywhere in ``out`` fails.
    """
    if out.shape != out_oracle.shape or out_ref.shape != out_oracle.shape:
        raise AssertionError(f"{name}: shapes differ: out {tuple(out.shape)}, ref {tuple(out_ref.shape)}, "
                             f"oracle {tuple(out_oracle.shape)}")
    o = out.detach().to(torch.float64)
    r = out_ref.detach().to(torch.float64)
    x = out_oracle.detach().to(torch.float64)
    if bool(torch.isnan(o).any()):
        raise AssertionError(f"{name}: {int(torch.isnan(o).sum())} NaN entries (unwritten or invalid)")
    inf = ~torch.isfinite(x)
    if bool(inf.any()):
        bad = inf & (o != x)
        if bool(bad.any()):
            raise AssertionError(f"{name}: {int(bad.sum())} entries differ where the oracle is ±inf")
    fin = ~inf
    if bool((~torch.isfinite(o) & fin).any()):
        raise AssertionError(f"{name}: infinite entries where the oracle is finite")
    err = float((o - x)[fin].abs().max()) if bool(fin.any()) else 0.0
    ref_err = float((r - x)[fin].abs().max()) if bool(fin.any()) else 0.0
    atol = max(rounding_atol(out_ref.detach()[fin.to(out_ref.device)]), min_atol)
    bound = mult * ref_err + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} > {mult:g} x reference error {ref_err:.3e} "
                             f"+ rounding {atol:.3e} (= {bound:.3e})")
    return {"err": err, "ref_err": ref_err, "atol": atol, "bound": bound}


def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf with t's values (and strides, when t is dense), optionally converted."""
    x = t.detach()
    x = x.to(dtype) if dtype is not None and dtype != x.dtype else x.clone(memory_format=torch.preserve_format)
    return x.requires_grad_(True)


def run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None, *,
                  backend: str, dtype: torch.dtype | None = None, rng_seed: int = 1234,
                  **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """memattn.attention + autograd on fresh leaves; returns (out, lse, dq, dk, dv) or (out, lse).

    The global RNG is forked and seeded with ``rng_seed`` around the call, so every backend
    draws the same dropout seed. ``dtype`` converts the inputs (the float64 oracle)."""
    qq, kk, vv = _leaf(q, dtype), _leaf(k, dtype), _leaf(v, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng_seed)
        out, lse = memattn.attention(qq, kk, vv, backend=backend, return_lse=True, **kwargs)
    if dout is None:
        return out, lse
    d = dout.to(out.dtype) if dtype is not None else dout
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), d)
    return out, lse, dq, dk, dv


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str,
                    dout: torch.Tensor | None = None, grads: bool = True, out_mult: float = OUT_MULT,
                    grad_mult: float = GRAD_MULT, **kwargs: Any) -> dict[str, dict[str, float]]:
    """Run ``backend``, the same-dtype reference and the float64 oracle on (q, k, v); assert the
    rule on out, lse and (if ``grads``) dq, dk, dv.

    Args:
        q, k, v: inputs in the kernel's dtype (any strides; they are not modified).
        backend: the backend under test ("cpu", "triton", ...).
        dout: output gradient (default: a seeded standard normal in q's dtype).
        grads: also check dq, dk, dv.
        out_mult, grad_mult: multiples of the reference's error (2 and 3 by default).
        **kwargs: forwarded to memattn.attention (pattern, causal, scale, softcap, dropout_p).
    Returns:
        {"out": numbers, "lse": ..., "dq": ..., "dk": ..., "dv": ...} from :func:`check_close`.
    """
    if grads and dout is None:
        gen = torch.Generator().manual_seed(99)
        shape = q.shape[:3] + v.shape[3:]
        dout = torch.randn(shape, generator=gen, dtype=torch.float32).to(q.dtype)
    d = dout if grads else None
    res = run_attention(q, k, v, d, backend=backend, **kwargs)
    ref = run_attention(q, k, v, d, backend="reference", **kwargs)
    ora = run_attention(q, k, v, d, backend="reference", dtype=torch.float64, **kwargs)
    names = ("out", "lse", "dq", "dk", "dv") if grads else ("out", "lse")
    report = {}
    for i, name in enumerate(names):
        if res[i].dtype != (torch.float32 if name == "lse" else q.dtype):
            raise AssertionError(f"{name}: dtype {res[i].dtype}, expected {torch.float32 if name == 'lse' else q.dtype}")
        mult = out_mult if name in ("out", "lse") else grad_mult
        report[name] = check_close(res[i], ref[i], ora[i], mult=mult, name=f"{backend} {name}",
                                   min_atol=lse_floor(ora[i]) if name == "lse" else 0.0)
    return report
