"""H200 run for the causal linear-attention Triton kernels (memattn/approx/triton_linear.py).

    OUT=/some/dir .venv/bin/python scripts/gpu_linear.py          # about 1-2 minutes

1. Correctness, float32: the Triton path of ``linear_attention(causal=True)`` against the
   PyTorch chunked path (elu+1 and FAVOR+ features, ragged N, GQA, key padding), outputs
   and q/k/v gradients.
2. bfloat16, B·N = 16384, H = 16, D = 128, N ∈ {4096, 16384, 65536}, on precomputed features
   φ(q), φ(k) (elu+1): for every launch shape in VARIANTS (the session-3 pipelined shape, the
   chooser's default, wider per-chunk tiles, unpipelined state sweeps, the backward's two
   state sweeps fused into one launch) and for fla's
   ``chunk_linear_attn`` (fla-core 0.6.0, layout (B, N, H, D), normalize=True; the same
   function Σ_{j<=i}(φq_i·φk_j) v_j / (φq_i·Σ_{j<=i} φk_j), its scale cancels; eps 1e-6 here vs
   1e-10/scale there): the output error and the three gradients' errors against a float32
   chunked reference (autograd through it), then forward and forward+backward times (medians
   of triton.testing.do_bench, ms), peak memory (max_memory_allocated, MiB = 2**20 bytes) and,
   at 16k, a per-kernel profile. A speed figure counts only where ``correct`` holds (_correct).
Prints a table and writes $OUT/linear.json.

fla's first call autotunes: its state kernel alone (``chunk_fwd_kernel_h``) has 48 configs
(BK, BV in {32, 64} x 4 warp counts x 3 stage counts), each compiled on first use, and the
backward has several such kernels: about 2.7 minutes on a fresh H200 (session 4). Its
autotune results are small files in the Triton cache (``*.autotune.json``, FLA_CACHE_RESULTS=1
is fla's default); session 4 ran ``GPU_LINEAR_ONLY=fla`` once with TRITON_CACHE_DIR set, kept
those files (tar, 13 kB) and unpacked them into TRITON_CACHE_DIR of later calls, where fla
then compiled only its chosen configs (seconds). Their keys hash the kernel source and the
Triton version, so they are valid for fla-core 0.6.0 on Triton 3.6 only. That tar is kept as
``benchmarks/h200_fla_autotune_cache.tgz``:

    mkdir -p /tmp/tc && tar xzf benchmarks/h200_fla_autotune_cache.tgz -C /tmp/tc
    TRITON_CACHE_DIR=/tmp/tc OUT=$OUT python3 scripts/gpu_linear.py       # fla compiles 1 config each
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
import triton

from memattn.approx import FavorPositive, favor_projection, linear_attention
from memattn.approx import triton_linear as _tl
from memattn.approx.triton_linear import LinearTiles, causal_linear_features

MiB = 2 ** 20
SIZES = (4096, 16384, 65536)
H, D, TOKENS = 16, 128, 16384


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def reference_features(pq, pk, v, chunk: int = 256, eps: float = 1e-6,
                       round_to: torch.dtype | None = None) -> torch.Tensor:
    """float32 chunked causal linear attention on features, layout (B, N, H, F) -> (B, N, H, Dv);
    differentiable (no in-place updates), so its gradients are the float32 reference too.

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
    outs = []
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        a = torch.tril(pq[:, :, c0:c1] @ pk[:, :, c0:c1].transpose(-1, -2))
        num = pq[:, :, c0:c1] @ rnd(S) + rnd(a) @ v[:, :, c0:c1]
        den = (pq[:, :, c0:c1] * z[:, :, None]).sum(-1) + a.sum(-1) + eps
        outs.append(num / den[..., None])
        S = S + pk[:, :, c0:c1].transpose(-1, -2) @ v[:, :, c0:c1]
        z = z + pk[:, :, c0:c1].sum(2)
    out = torch.cat(outs, 2).transpose(1, 2)
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


# Launch shapes timed side by side (session 4): the session-3 shape (pipelined per-chunk
# kernels, 64-wide tiles), the chooser's default, wider per-chunk tiles, unpipelined state
# sweeps, and the backward's two sweeps in one launch.
VARIANTS = {
    "s3": LinearTiles(state_block=64, chunk_block=64, num_warps=4, chunk_stages=None, state_stages=None),
    "default": None,
    "s4": "s4",             # session 4's default: unpipelined per-chunk kernels, 32-wide states if few programs
    "c128w4": "c128w4",
    "c128w8": "c128w8",
    "allst1": "allst1",
    "fused": "fused",
}


def _tiles(name: str, n_bh: int) -> LinearTiles | None:
    spec = VARIANTS[name]
    if spec is None or isinstance(spec, LinearTiles):
        return spec
    base = _tl.tiles_for(n_bh, D, D, torch.device("cuda"))
    if spec == "s4":
        progs64 = n_bh * triton.cdiv(D, 64) ** 2
        return LinearTiles(state_block=64 if progs64 >= _tl._sm_count(torch.device("cuda")) else 32, chunk_stages=1)
    if spec == "c128w4":
        return dataclasses.replace(base, chunk_block=128, num_warps=4)
    if spec == "c128w8":
        return dataclasses.replace(base, chunk_block=128, num_warps=8)
    if spec == "allst1":
        return dataclasses.replace(base, state_stages=1)
    if spec == "fused":
        return dataclasses.replace(base, fused_sweeps=True)
    raise KeyError(spec)


def _grad_errs(fn, pq, pk, v, gout, ref_grads) -> dict:
    a, b, c = (t.detach().clone().requires_grad_() for t in (pq, pk, v))
    got = torch.autograd.grad(fn(a, b, c), (a, b, c), gout)
    return {n: rel(x, y) for n, x, y in zip(("dpq", "dpk", "dv"), got, ref_grads)}


def _time(fn, pq, pk, v, gout) -> dict:
    row = {"fwd_ms": triton.testing.do_bench(lambda: fn(pq, pk, v), warmup=25, rep=100)}
    a, b, c = (t.detach().clone().requires_grad_() for t in (pq, pk, v))

    def step():
        fn(a, b, c).backward(gout)
    row["fwdbwd_ms"] = triton.testing.do_bench(step, warmup=10, rep=50, grad_to_none=[a, b, c])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    row["fwdbwd_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / MiB
    return row


def _kernel_profile(fn, pq, pk, v, gout) -> dict:
    """GPU time per kernel name (µs) of one forward+backward, from torch.profiler."""
    a, b, c = (t.detach().clone().requires_grad_() for t in (pq, pk, v))
    fn(a, b, c).backward(gout)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn(a, b, c).backward(gout)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / 5, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:14])


def bench_size(n: int, fla_fn, which: tuple[str, ...] = ("memattn", "fla")) -> dict:
    B = max(1, TOKENS // n)
    g = torch.Generator(device="cuda").manual_seed(n)
    x = [torch.randn(B, n, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)]
    pq, pk = (torch.nn.functional.elu(t.float()).add(1.0).to(torch.bfloat16) for t in x[:2])
    v = x[2]
    gout = torch.randn(v.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    row = {"N": n, "B": B, "H": H, "D": D, "dtype": "bfloat16"}
    fa, fb, fc = (t.detach().float().requires_grad_() for t in (pq, pk, v))
    ref = reference_features(fa, fb, fc)
    ref_grads = torch.autograd.grad(ref, (fa, fb, fc), gout.float())
    ref = ref.detach()
    del fa, fb, fc
    # the bar for bf16 outputs: the same algorithm's rounding
    row["same_casts_err"] = rel(reference_features(pq, pk, v, chunk=64, round_to=pq.dtype), ref)

    def ours(a, b, c):
        return causal_linear_features(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)).transpose(1, 2)

    impls = {}
    if "memattn" in which:
        for name in VARIANTS:
            impls[f"memattn_{name}"] = (ours, name)
    if "fla" in which and fla_fn is not None:
        impls["fla"] = (lambda a, b, c: fla_fn(a, b, c, normalize=True)[0], None)
    for key, (fn, variant) in impls.items():
        print(f"[{time.strftime('%H:%M:%S')}] N={n} {key} ...", flush=True)
        _tl._OVERRIDE[0] = None if variant is None else _tiles(variant, B * H)
        r = {}
        try:
            with torch.no_grad():
                out = fn(pq, pk, v)
            r["err"] = rel(out, ref)
            d = (out.float() - ref).abs().amax(dim=(0, 2, 3))
            r["worst_pos"] = int(d.argmax())
            r["err_by_quarter"] = [float(t.max() / ref.abs().max()) for t in d.chunk(4)]
            del out
            r["grad_err"] = _grad_errs(fn, pq, pk, v, gout, ref_grads)
            r.update(_time(fn, pq, pk, v, gout))
            if variant == "default" and n == 16384 or key == "fla" and n == 16384:
                r["kernels_us"] = _kernel_profile(fn, pq, pk, v, gout)
            if variant is not None:
                r["tiles"] = dataclasses.asdict(_tl.tiles_for(B * H, D, D, pq.device))
        except Exception as e:  # recorded, the row goes on
            r["error"] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.empty_cache()
        finally:
            _tl._OVERRIDE[0] = None
        row[key] = r
    return row


def _correct(row: dict, key: str) -> bool | None:
    """A speed figure counts only where the output error is within 2x the same-casts bound
    (or 2x fla's) and every gradient's error within 2x fla's (None: fla's not measured)."""
    r = row.get(key, {})
    if "err" not in r:
        return False
    fla = row.get("fla", {})
    bar = 2 * max(row["same_casts_err"], fla.get("err", 0.0))
    if r["err"] > bar:
        return False
    if "grad_err" not in fla:
        return None
    return all(r["grad_err"][g] <= 2 * fla["grad_err"][g] for g in ("dpq", "dpk", "dv"))


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
            if len(rows) <= i:
                rows.append(r)
            else:
                rows[i].update({k_: v_ for k_, v_ in r.items() if k_ == "fla"})
            for key in rows[i]:
                if key.startswith("memattn_"):
                    rows[i][key]["correct"] = _correct(rows[i], key)
            print(f"[{time.strftime('%H:%M:%S')}] {json.dumps(rows[i])}", flush=True)
            with open(path, "w") as fh:
                json.dump(result, fh, indent=1)
    print(f"\ncausal linear attention, bf16, H={H}, D={D}, B·N={TOKENS}; fla {fla_version}; "
          "ratio = fla time / memattn time (> 1: memattn faster)")
    print("| N | impl | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio | err out | err dpq/dpk/dv | correct |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        fla = row.get("fla", {})
        for key in [k_ for k_ in row if k_.startswith("memattn_")] + ["fla"]:
            r = row.get(key)
            if not isinstance(r, dict) or "fwd_ms" not in r:
                print(f"| {row['N']} | {key} | {r} |")
                continue
            rf = f"{fla['fwd_ms'] / r['fwd_ms']:.2f}x" if "fwd_ms" in fla else "n/a"
            rb = f"{fla['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in fla else "n/a"
            ge = "/".join(f"{r['grad_err'][g]:.4f}" for g in ("dpq", "dpk", "dv"))
            print(f"| {row['N']} | {key} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {rf} | {rb} | "
                  f"{r['err']:.4f} | {ge} | {r.get('correct', '')} |")
    result["wall_s"] = time.time() - t0
    with open(os.path.join(out_dir, "linear.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {os.path.join(out_dir, 'linear.json')} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
