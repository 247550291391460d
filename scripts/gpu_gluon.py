"""H200 check and timing of the Gluon forward experiment (benchmarks/experiments/gluon_fwd.py).

First the correctness grid: D in {64, 128}, bfloat16 and float16, no mask / causal / causal
window, with and without GQA, against a float32 oracle by the FlashAttention rule (design.md §4):
max error ≤ 2 × a same-dtype naive attention's + 2·max|o + 0.3 − 0.3 − o|; the lse within 2 × the
naive lse's error + 1e-4. Then the forward timings, each case in one process and one run:
the Gluon kernel (STAGES 2 and 3), memattn's Triton forward, FlexAttention with the same mask,
and SDPA's cuDNN and FlashAttention-2 backends on dense cases. Prints a table last and writes
JSON to --out.

    PYTHONPATH=$PWD python scripts/gpu_gluon.py --out $OUT/gluon.json [--budget 420]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "experiments"))
sys.path.insert(0, os.path.dirname(__file__))


def _probe(mode: str) -> int:
    """One small call of a mode, synchronised: run under `timeout` first, so that a barrier
    protocol that hangs costs a minute and not the whole device call."""
    import torch
    from gluon_fwd import gluon_forward

    q = torch.randn(1, 2, 512, 128, device="cuda", dtype=torch.bfloat16)
    out, lse = gluon_forward(q, q, q, causal=True, window=256, stages=2, ws=mode == "ws", pp=mode == "pp")
    torch.cuda.synchronize()
    print(f"probe {mode}: finite={bool(torch.isfinite(out).all())}", flush=True)
    return 0


def _check(dev: str, modes: tuple[str, ...]) -> list[dict]:
    import torch
    from gluon_fwd import gluon_forward

    rows = []
    torch.manual_seed(0)
    grid = [(D, dt, mask, N, H, HKV, mode, st)
            for D in (128, 64) for dt in (torch.bfloat16, torch.float16)
            for mask in ("full", "causal", "window256", "window1024")
            for (N, H, HKV) in ((1024, 4, 4), (2048, 4, 2))
            for mode, st in (("plain", 2), ("ws", 2), ("ws", 3), ("pp", 2), ("pp", 3)) if mode in modes]
    for D, dt, mask, N, H, HKV, mode, st in grid:
        causal = mask != "full"
        window = int(mask[6:]) if mask.startswith("window") else None
        q = torch.randn(1, H, N, D, device=dev, dtype=dt)
        k = torch.randn(1, HKV, N, D, device=dev, dtype=dt)
        v = torch.randn(1, HKV, N, D, device=dev, dtype=dt)
        row = {"D": D, "dtype": str(dt)[6:], "mask": mask, "N": N, "H": H, "HKV": HKV, "mode": mode, "stages": st}
        try:
            out, lse = gluon_forward(q, k, v, causal=causal, window=window, stages=st, poison=True,
                                     ws=mode == "ws", pp=mode == "pp")
            torch.cuda.synchronize()
            rep = H // HKV
            kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            i = torch.arange(N, device=dev)[:, None]
            j = torch.arange(N, device=dev)[None, :]
            keep = torch.ones(N, N, dtype=torch.bool, device=dev)
            if causal:
                keep &= j <= i
            if window is not None:
                keep &= j >= i - window
            scale = 1 / math.sqrt(D)
            s32 = (q.float() @ kk.float().transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
            o32 = torch.softmax(s32, -1) @ vv.float()
            l32 = torch.logsumexp(s32, -1)
            sd = (q @ kk.transpose(-1, -2)).float().mul(scale).masked_fill(~keep, float("-inf"))
            on = torch.softmax(sd, -1).to(dt) @ vv
            ln = torch.logsumexp(sd, -1)
            atol = 2.0 * float((o32.to(dt) + 0.3 - 0.3 - o32.to(dt)).abs().max())
            err = float((out.float() - o32).abs().max())
            base = float((on.float() - o32).abs().max())
            lerr = float((lse - l32).abs().max())
            lbase = float((ln - l32).abs().max())
            row.update(err=err, tol=2 * base + atol, lse_err=lerr, lse_tol=2 * lbase + 1e-4,
                       finite=bool(torch.isfinite(out).all()))
            row["ok"] = row["finite"] and bool(torch.isfinite(lse).all()) and err <= row["tol"] and lerr <= row["lse_tol"]
        except Exception as e:  # a failure is a row, never a crash of the run
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-300:]}")
        rows.append(row)
    return rows


def _time_case(kind: str, B: int, H: int, N: int, D: int, dev: str, rounds: int,
               modes: tuple[str, ...]) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    import memattn
    from gluon_fwd import gluon_forward
    from gpu_triton import _flex_fns, allowed_pairs, flex_setup, flops

    dt = torch.bfloat16
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(3))
    mod, pat = flex_setup(kind, N, H, D, dev)
    pairs = allowed_pairs(kind, N, mod, dev)
    causal = kind != "full"
    window = 1024 if kind == "window1024" else None
    impls = {
        "gluon_s2": lambda: gluon_forward(q, k, v, causal=causal, window=window, stages=2),
        "gluon_ws": lambda: gluon_forward(q, k, v, causal=causal, window=window, stages=2, ws=True),
        "gluon_pp": lambda: gluon_forward(q, k, v, causal=causal, window=window, stages=2, pp=True),
        "gluon_pp3": lambda: gluon_forward(q, k, v, causal=causal, window=window, stages=3, pp=True),
        "memattn": lambda: memattn.attention(q, k, v, pattern=pat, backend="triton"),
    }
    impls = {nm: f for nm, f in impls.items()
             if not nm.startswith("gluon_") or {"s2": "plain", "ws": "ws"}.get(nm[6:], "pp") in modes}
    if kind in ("full", "causal"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for nm, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def f(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            impls[nm] = f
    f, _, build = _flex_fns(kind, q, k, v, torch.randn_like(q), N, dev)
    impls["flex"] = f
    # the Gluon output against memattn's on the whole problem (informative; the grid is the check)
    og = impls[[nm for nm in impls if nm.startswith("gluon_")][-1]]()[0]
    om = impls["memattn"]()
    agree = float((og.float() - om.float()).abs().max())
    times: dict[str, list[float]] = {nm: [] for nm in impls}
    for r in range(rounds):
        order = list(impls) if r % 2 == 0 else list(reversed(list(impls)))
        for nm in order:
            try:
                impls[nm]()
                times[nm].append(float(do_bench(impls[nm], warmup=10, rep=40, return_mode="median")))
            except Exception as e:
                times[nm].append(float("nan"))
                print(f"  {kind} N={N} {nm}: {type(e).__name__}: {str(e)[-200:]}", flush=True)
    rows = []
    for nm, ts in times.items():
        ms = min(ts)
        rows.append({"kind": kind, "B": B, "H": H, "N": N, "D": D, "impl": nm, "fwd_ms": ms, "rounds_ms": ts,
                     "fwd_tflops": flops(B, H, pairs, D) / ms / 1e9, "agree_vs_memattn": agree,
                     "flex_build": build if nm == "flex" else None})
    torch.cuda.empty_cache()
    return rows


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

    def mem(on: bool):
        def f():
            hopper.set_enabled(on)
            return memattn.attention(q, k, v, pattern=pat, backend="triton")
        return f
    fwd = {"memattn": mem(True), "memattn_triton": mem(False)}
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
    for nm in ("memattn", "memattn_triton"):
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
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later cases are skipped past it")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="plain,ws,pp", help="kernel forms to check and time")
    p.add_argument("--probe", default=None, help="run one small call of this mode and exit")
    p.add_argument("--e2e", action="store_true",
                   help="memattn.attention with / without the Gluon kernels against the peers, fwd and fwd+bwd "
                        "(no kernel grid; --cases as for the kernel timing)")
    p.add_argument("--cases", default="window1024:1:16:65536:128,causal:1:16:16384:128,full:1:16:16384:128,"
                   "causal:4:16:4096:128,window1024:1:16:131072:128,window1024:1:16:16384:128,"
                   "causal:1:32:16384:64,full:4:16:4096:128,causal:16:16:1024:128,causal:4:32:4096:64")
    a = p.parse_args(argv)
    import torch

    if a.probe:
        return _probe(a.probe)
    modes = tuple(m for m in a.modes.split(",") if m)

    t0 = time.time()
    dev = "cuda"
    res: dict = {"env": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}}
    if a.e2e:
        return _e2e(a, res, t0, dev)
    res["modes"] = modes
    res["check"] = _check(dev, modes)
    bad = [r for r in res["check"] if not r["ok"]]
    print(f"check: {len(res['check']) - len(bad)}/{len(res['check'])} passed ({time.time() - t0:.0f} s)", flush=True)
    for r in bad[:12]:
        print("  FAIL", r, flush=True)
    res["timing"] = []
    for spec in a.cases.split(","):
        if time.time() - t0 > a.budget:
            res.setdefault("skipped", []).append(spec)
            continue
        kind, B, H, N, D = spec.split(":")
        try:
            res["timing"] += _time_case(kind, int(B), int(H), int(N), int(D), dev, a.rounds, modes)
        except Exception:
            res.setdefault("errors", []).append({"case": spec, "trace": traceback.format_exc()[-800:]})
            print(traceback.format_exc()[-800:], flush=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"  {spec} done ({time.time() - t0:.0f} s)", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'case':28s} {'impl':11s} {'ms':>8s} {'TF/s':>6s}  vs flex  vs cudnn  vs memattn")
    by = {}
    for r in res["timing"]:
        by.setdefault((r["kind"], r["B"], r["N"], r["D"]), {})[r["impl"]] = r["fwd_ms"]
    for key, d in by.items():
        for nm, ms in d.items():
            rel = lambda peer: f"{d[peer] / ms:7.3f}" if peer in d and ms == ms else "      -"  # noqa: E731
            print(f"{str(key):28s} {nm:11s} {ms:8.3f} {[r for r in res['timing'] if (r['kind'], r['B'], r['N'], r['D']) == key and r['impl'] == nm][0]['fwd_tflops']:6.0f}  "
                  f"{rel('flex')}  {rel('sdpa_cudnn')}  {rel('memattn')}")
    print(f"check: {len(res['check']) - len(bad)}/{len(res['check'])} passed; skipped: {res.get('skipped', [])}")
    return 0 if not bad else 1


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
