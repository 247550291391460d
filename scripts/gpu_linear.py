"""H200 run for the causal linear-attention Triton kernels (memattn/approx/triton_linear.py).

    OUT=/some/dir .venv/bin/python scripts/gpu_linear.py          # about 1-2 minutes

1. Correctness, float32: the Triton path of ``linear_attention(causal=True)`` against the
   PyTorch chunked path (elu+1 and FAVOR+ features, ragged N, GQA, key padding), outputs
   and q/k/v gradients.
2. Speed, bfloat16, B·N = 16384, H = 16, D = 128, N ∈ {4096, 16384, 65536}: forward and
   forward+backward of the kernels on precomputed features φ(q), φ(k) (elu+1), against fla's
   ``chunk_linear_attn`` (fla-core 0.6.0, layout (B, N, H, D), normalize=True) on the same
   features, which computes the same function: Σ_{j<=i}(φq_i·φk_j) v_j / (φq_i·Σ_{j<=i} φk_j)
   (its scale cancels; eps 1e-6 here vs 1e-10/scale there). Both are checked against a
   float32 chunked PyTorch reference first; times are medians of triton.testing.do_bench (ms),
   peak memory from torch.cuda.max_memory_allocated (MiB = 2**20 bytes).
Prints a table and writes $OUT/linear.json.

fla's first call autotunes: its state kernel alone (``chunk_fwd_kernel_h``) has 48 configs
(BK, BV in {32, 64} x 4 warp counts x 3 stage counts), each compiled on first use, and the
backward has several such kernels; three calls of up to 200 s never got through it. Give it
a call of its own: ``GPU_LINEAR_ONLY=fla`` runs only fla (timestamps per size); its compiled
kernels and autotune results stay in the machine's Triton cache (FLA_CACHE_RESULTS=1, fla's
default), so a second call made while the machine is still warm (it is given back 30 s
after a call) times both libraries without recompiling.
"""

from __future__ import annotations

import json
import os
import time

import torch
import triton

from memattn.approx import FavorPositive, favor_projection, linear_attention
from memattn.approx.triton_linear import causal_linear_features

MiB = 2 ** 20
SIZES = (4096, 16384, 65536)
H, D, TOKENS = 16, 128, 16384


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def reference_features(pq, pk, v, chunk: int = 256, eps: float = 1e-6,
                       round_to: torch.dtype | None = None) -> torch.Tensor:
    """float32 chunked causal linear attention on features, layout (B, N, H, F) -> (B, N, H, Dv).

    With ``round_to`` (the same-roundings bound), the carried state and the in-chunk scores
    are rounded to that dtype before their products and the output is rounded, as the
    kernels do (fp32 accumulation otherwise): the error any such chunked kernel (ours,
    fla's) is expected to have against the float32 result."""
    def rnd(t: torch.Tensor) -> torch.Tensor:
        return t if round_to is None else t.to(round_to).float()

    pq, pk, v = (t.float().transpose(1, 2) for t in (pq, pk, v))     # (B, H, N, ·)
    B, Hh, N, F = pq.shape
    S = pq.new_zeros(B, Hh, F, v.shape[-1])
    z = pq.new_zeros(B, Hh, F)
    out = torch.empty_like(v)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        a = torch.tril(pq[:, :, c0:c1] @ pk[:, :, c0:c1].transpose(-1, -2))
        num = pq[:, :, c0:c1] @ rnd(S) + rnd(a) @ v[:, :, c0:c1]
        den = (pq[:, :, c0:c1] * z[:, :, None]).sum(-1) + a.sum(-1) + eps
        out[:, :, c0:c1] = num / den[..., None]
        S += pk[:, :, c0:c1].transpose(-1, -2) @ v[:, :, c0:c1]
        z += pk[:, :, c0:c1].sum(2)
    out = out.transpose(1, 2)
    return out if round_to is None else out.to(round_to)


def correctness_fp32() -> dict:
    res = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = (("elu_gqa_pad", "elu", 2, 8, 4, 3001, 128), ("favor_m96", "favor", 1, 4, 4, 1000, 64))
    for name, fm, B, Hq, Hkv, N, Dh in cases:
        q = torch.randn(B, Hq, N, Dh, device="cuda", generator=g).requires_grad_()
        k = torch.randn(B, Hkv, N, Dh, device="cuda", generator=g).requires_grad_()
        v = torch.randn(B, Hkv, N, Dh, device="cuda", generator=g).requires_grad_()
        km = torch.ones(B, N, dtype=torch.bool, device="cuda")
        km[-1, N - 100:] = False
        fmap = fm if fm == "elu" else FavorPositive(favor_projection(Dh, 96, generator=torch.Generator().manual_seed(1)))
        a = linear_attention(q, k, v, feature_map=fmap, causal=True, key_padding_mask=km, backend="triton")
        b = linear_attention(q, k, v, feature_map=fmap, causal=True, key_padding_mask=km, backend="pytorch")
        gout = torch.randn(a.shape, device="cuda", generator=g)
        ga = torch.autograd.grad(a, (q, k, v), gout)
        gb = torch.autograd.grad(b, (q, k, v), gout)
        res[name] = {"out": rel(a, b), "dq": rel(ga[0], gb[0]), "dk": rel(ga[1], gb[1]), "dv": rel(ga[2], gb[2])}
    return res


def bench_size(n: int, fla_fn, which: tuple[str, ...] = ("memattn", "fla")) -> dict:
    B = max(1, TOKENS // n)
    g = torch.Generator(device="cuda").manual_seed(n)
    x = [torch.randn(B, n, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]
    pq, pk = (torch.nn.functional.elu(t.float()).add(1.0).to(torch.bfloat16) for t in x[:2])
    v = x[2]
    row = {"N": n, "B": B, "H": H, "D": D, "dtype": "bfloat16"}
    ref = reference_features(pq, pk, v)
    # the bar for bf16: the same algorithm's rounding (session 3 found memattn's GPU error
    # 4-10x above it on CPU emulation; the interpreter in float16 matches it exactly)
    row["same_casts_err"] = rel(reference_features(pq, pk, v, chunk=64, round_to=pq.dtype), ref)
    # diagnostic: memattn's error with software pipelining off in every kernel
    from memattn.approx import triton_linear as _tl
    _tl._NUM_STAGES[0] = 1
    try:
        with torch.no_grad():
            row["memattn_err_stages1"] = rel(causal_linear_features(
                pq.transpose(1, 2), pk.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), ref)
    except Exception as e:  # recorded, the row goes on
        row["memattn_err_stages1"] = f"error: {type(e).__name__}: {e}"[:200]
    finally:
        _tl._NUM_STAGES[0] = None

    def ours(a, b, c):
        return causal_linear_features(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)).transpose(1, 2)

    impls = {"memattn": ours}
    if fla_fn is not None:
        impls["fla"] = lambda a, b, c: fla_fn(a, b, c, normalize=True)[0]
    impls = {k_: f_ for k_, f_ in impls.items() if k_ in which}
    for name, fn in impls.items():
        print(f"[{time.strftime('%H:%M:%S')}] N={n} {name} ...", flush=True)
        try:
            with torch.no_grad():
                out = fn(pq, pk, v)
            row[f"{name}_err"] = rel(out, ref)
            # where the worst error sits (sequence position, and its chunk of 64): a diagnostic
            # for the bf16 gap found in session 3 (early rows: in-chunk scores; late: the state)
            d = (out.float() - ref.float()).abs().amax(dim=(0, 2, 3))
            row[f"{name}_worst_pos"] = int(d.argmax())
            row[f"{name}_err_by_quarter"] = [float(x.max() / ref.float().abs().max())
                                             for x in d.chunk(4)]
            del out
            row[f"{name}_fwd_ms"] = triton.testing.do_bench(lambda: fn(pq, pk, v), warmup=25, rep=100)
            a, b, c = (t.detach().clone().requires_grad_() for t in (pq, pk, v))
            gout = torch.randn_like(v)

            def step():
                fn(a, b, c).backward(gout)
            row[f"{name}_fwdbwd_ms"] = triton.testing.do_bench(step, warmup=10, rep=50, grad_to_none=[a, b, c])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row[f"{name}_fwdbwd_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / MiB
            del a, b, c, gout
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_fwd_ms"] = "OOM"
            torch.cuda.empty_cache()
    if "memattn_err" not in row:
        return row
    row["memattn_correct"] = _correct(row)
    return row


def _correct(row: dict) -> bool:
    """A speed figure counts only where our error is within 2x the same-casts bound (and,
    where fla ran, within 2x fla's)."""
    bar = 2 * row["same_casts_err"]
    if "fla_err" in row:
        bar = max(bar, 2 * row["fla_err"])
    return row["memattn_err"] <= bar


def main() -> None:
    assert torch.cuda.is_available(), "this script needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False     # the float32 references stay float32
    out_dir = os.environ.get("OUT", ".")
    t0 = time.time()
    try:
        from fla.ops.linear_attn import chunk_linear_attn as fla_fn
        import fla
        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError as e:   # reported in the table and the JSON, never silently
        fla_fn, fla_version = None, f"unavailable ({e})"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "fla": fla_version}
    result["correctness_fp32_triton_vs_pytorch"] = correctness_fp32()
    print("float32, Triton vs PyTorch chunked path (max rel err):")
    for k, v in result["correctness_fp32_triton_vs_pytorch"].items():
        print(f"  {k}: " + ", ".join(f"{n} {e:.2e}" for n, e in v.items()))
    path = os.path.join(out_dir, "linear.json")
    # memattn at every size first, then fla (whose autotuning is slow): a call cut short by
    # its time limit still returns our rows; the JSON is rewritten after each row.
    rows = []
    result["rows"] = rows
    only = os.environ.get("GPU_LINEAR_ONLY", "")
    if only not in ("", "fla", "memattn"):
        raise SystemExit(f"GPU_LINEAR_ONLY must be 'fla' or 'memattn', got {only!r}")
    passes = (("memattn",), ("fla",)) if not only else ((only,),)
    for which in passes:
        for i, n in enumerate(SIZES):
            r = bench_size(n, fla_fn, which)
            if which == ("memattn",) or len(rows) <= i:
                rows.append(r)
            else:
                rows[i].update({k_: v_ for k_, v_ in r.items() if k_.startswith("fla")})
                if "memattn_err" in rows[i]:
                    rows[i]["memattn_correct"] = _correct(rows[i])
            print(f"[{time.strftime('%H:%M:%S')}] {json.dumps(rows[i])}", flush=True)
            with open(path, "w") as fh:
                json.dump(result, fh, indent=1)
            if fla_fn is None and which == ("fla",):
                break
    print(f"\ncausal linear attention, bf16, H={H}, D={D}, B·N={TOKENS}; fla {fla_version}")
    print("| N | B | memattn fwd ms | fla fwd ms | memattn fwd+bwd ms | fla fwd+bwd ms | fwd ratio | fwd+bwd ratio |"
          " err memattn / fla | peak MiB memattn / fla |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        def f(key):
            val = r.get(key)
            return f"{val:.3f}" if isinstance(val, float) else str(val)
        ratio_f = ratio_b = "n/a"
        if all(isinstance(r.get(k_), float) for k_ in ("fla_fwd_ms", "memattn_fwd_ms", "fla_fwdbwd_ms",
                                                         "memattn_fwdbwd_ms")):
            ratio_f = f"{r['fla_fwd_ms'] / r['memattn_fwd_ms']:.2f}x"
            ratio_b = f"{r['fla_fwdbwd_ms'] / r['memattn_fwdbwd_ms']:.2f}x"
        ok = "" if r.get("memattn_correct") else " (INCORRECT: speed not valid)"
        print(f"| {r['N']} | {r['B']} | {f('memattn_fwd_ms')} | {f('fla_fwd_ms')} | {f('memattn_fwdbwd_ms')} | "
              f"{f('fla_fwdbwd_ms')} | {ratio_f} | {ratio_b} | {f('memattn_err')} / {f('fla_err')} | "
              f"{f('memattn_fwdbwd_peak_MiB')} / {f('fla_fwdbwd_peak_MiB')} |{ok}")
    print("ratio = fla time / memattn time (> 1: memattn faster)")
    result["wall_s"] = time.time() - t0
    with open(os.path.join(out_dir, "linear.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {os.path.join(out_dir, 'linear.json')} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
