"""H200: memattn.attention with and without its sm_90 Gluon kernels, against the peers.

For each case (``--cases kind:B:H:N:D``), in one process and one run: ``memattn.attention``
with the Gluon forward, dK/dV (memattn/backends/triton/hopper.py) and dQ (hopper_dq.py)
kernels; with the Triton dQ pass instead (``memattn_tdq``: MEMATTN_GLUON_DQ=0); the same call
with all of them turned off (``hopper.set_enabled(False)``: the Triton kernels), FlexAttention with
the same mask, and on dense cases SDPA's cuDNN and FlashAttention-2 backends; forward and
forward+backward ``do_bench`` medians, ``--rounds`` rounds in alternating order, the best kept.
Also the launch counts of one memattn forward+backward (direct launches, Gluon launches).
Prints a table last and writes JSON to --out. Correctness is checked elsewhere first:
``tests/test_hopper.py`` and ``scripts/gpu_triton.py --sections correctness`` on the GPU.

    PYTHONPATH=$PWD:$PWD/tests python3 scripts/gpu_gluon.py --out $OUT/e2e.json [--budget 330]

The kernel forms tried before the one in the package (one 8-warp partition; a warp-specialised
8-warp consumer) are at commit e6e7bd4, benchmarks/experiments/gluon_fwd.py, with the kernel-level
mode of this script that timed them (benchmarks/NOTES.md, session 14, calls 1-3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))


def _e2e_case(kind: str, B: int, H: int, N: int, D: int, dev: str, rounds: int) -> list[dict]:
    """memattn.attention with the Gluon kernels (forward, dK/dV) and without them (the Triton
    kernels, hopper.set_enabled(False)), FlexAttention with the same mask, and SDPA's cuDNN /
    FlashAttention-2 on dense cases: forward and forward+backward do_bench, same run, rounds
    alternating in order; plus the launch counts of one memattn call (direct launches)."""
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    import memattn
    from memattn.backends.triton import hopper, launch
    from gpu_triton import _flex_fns, allowed_pairs, flex_setup, flops

    dt = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    mod, pat = flex_setup(kind, N, H, D, dev)
    pairs = allowed_pairs(kind, N, mod, dev)

    def mem(on: bool, gluon_dq: bool):
        def f():
            hopper.set_enabled(on)
            os.environ["MEMATTN_GLUON_DQ"] = "1" if gluon_dq else "0"
            return memattn.attention(q, k, v, pattern=pat, backend="triton")
        return f
    fwd = {"memattn": mem(True, True), "memattn_tdq": mem(True, False), "memattn_triton": mem(False)}
    if kind in ("full", "causal"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for nm, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def f(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
            fwd[nm] = f
    ff, _, build = _flex_fns(kind, q, k, v, do, N, dev)
    fwd["flex"] = ff
    counts = {}
    for nm in ("memattn", "memattn_tdq", "memattn_triton"):
        fwd[nm]().backward(do)                      # compile, build plans
        b0 = launch.launch_counts()
        fwd[nm]().backward(do)
        b1 = launch.launch_counts()
        counts[nm] = {k_: b1[k_] - b0[k_] for k_ in b1}
    times = {nm: {"fwd": [], "fwdbwd": []} for nm in fwd}
    for r in range(rounds):
        for nm in (list(fwd) if r % 2 == 0 else list(reversed(list(fwd)))):
            f = fwd[nm]

            def fb(f=f):
                f().backward(do)
            try:
                with torch.no_grad():
                    f()
                    times[nm]["fwd"].append(float(do_bench(lambda: f(), warmup=10, rep=40, return_mode="median")))
                fb()
                times[nm]["fwdbwd"].append(float(do_bench(fb, warmup=10, rep=40, grad_to_none=[q, k, v],
                                                          return_mode="median")))
            except Exception as e:
                print(f"  {kind} N={N} {nm}: {type(e).__name__}: {str(e)[-200:]}", flush=True)
    hopper.set_enabled(True)
    os.environ.pop("MEMATTN_GLUON_DQ", None)
    rows = []
    for nm, d in times.items():
        if not d["fwd"] or not d["fwdbwd"]:
            continue
        fm, bm = min(d["fwd"]), min(d["fwdbwd"])
        rows.append({"kind": kind, "B": B, "H": H, "N": N, "D": D, "impl": nm, "fwd_ms": fm, "fwdbwd_ms": bm,
                     "rounds": d, "fwd_tflops": flops(B, H, pairs, D) / fm / 1e9,
                     "fwdbwd_tflops": flops(B, H, pairs, D, 3.5) / bm / 1e9,
                     "launches": counts.get(nm), "flex_build": build if nm == "flex" else None})
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later cases are skipped past it")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default="window1024:1:16:65536:128,documents16_causal:1:16:65536:128,"
                   "causal:1:16:16384:128,window1024:1:16:16384:128,causal:4:16:4096:128,full:1:16:16384:128,"
                   "window1024:1:16:131072:128,causal:16:16:1024:128",
                   help="kind:B:H:N:D, comma-separated (kinds of gpu_triton.flex_setup)")
    a = p.parse_args(argv)
    import torch

    res: dict = {"env": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}}
    return _e2e(a, res, time.time(), "cuda")


def _e2e(a, res: dict, t0: float, dev: str) -> int:
    res["e2e"] = []
    for spec in a.cases.split(","):
        if time.time() - t0 > a.budget:
            res.setdefault("skipped", []).append(spec)
            continue
        kind, B, H, N, D = spec.split(":")
        try:
            res["e2e"] += _e2e_case(kind, int(B), int(H), int(N), int(D), dev, a.rounds)
        except Exception:
            res.setdefault("errors", []).append({"case": spec, "trace": traceback.format_exc()[-800:]})
            print(traceback.format_exc()[-800:], flush=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"  {spec} done ({time.time() - t0:.0f} s)", flush=True)
    print(f"{'case':30s} {'impl':15s} {'fwd ms':>8s} {'f+b ms':>8s}  fwd/fb vs flex  vs cudnn   launches")
    by: dict = {}
    for r in res["e2e"]:
        by.setdefault((r["kind"], r["N"], r["D"]), {})[r["impl"]] = r
    for key, d in by.items():
        for nm, r in d.items():
            def rel(peer):
                if peer not in d:
                    return "     -     "
                return f"{d[peer]['fwd_ms'] / r['fwd_ms']:5.3f}/{d[peer]['fwdbwd_ms'] / r['fwdbwd_ms']:5.3f}"
            ln = r.get("launches") or {}
            print(f"{str(key):30s} {nm:15s} {r['fwd_ms']:8.3f} {r['fwdbwd_ms']:8.3f}  {rel('flex')}  {rel('sdpa_cudnn')}"
                  f"  {ln}")
    print(f"skipped: {res.get('skipped', [])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
