"""H200: A/B of the Gluon backward kernels' schedule variants, one process, one run.

    PYTHONPATH=$PWD:$PWD/tests python3 scripts/gpu_gluon_variants.py --out $OUT/variants.json

A variant sets module values before the plans are built (``launch._VERSION`` is bumped so the
cached plans expire): ``hopper.BWD_PAIRS`` / ``hopper_dq.DQ_PAIRS`` (two query / key tiles per
loop iteration, the first tile's products in flight while the second issues its own) and the
ring depths ``hopper._BWD_STAGES[128]`` / ``hopper_dq._DQ_STAGES[128]``.

Correctness first: every variant's output and three gradients must be bit-identical to the
first variant's (the schedule changes, the arithmetic and its order do not) on small cases
with ragged edges (odd tile counts, Nq != Nk, documents, windows); the first variant is the
one ``tests/test_hopper.py`` checks against the reference. A variant that differs anywhere is
not timed. Then per timing case: ``memattn.attention`` forward+backward ``do_bench`` medians
for every variant and FlexAttention, ``--rounds`` rounds in alternating order (best kept), and
the per-kernel device time of each variant's dK/dV and dQ kernels (``torch.profiler``).
Prints a table last and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

# name: (BWD_PAIRS, DQ_PAIRS, dK/dV stages, dQ stages). "base" is the default the tests check
# (session 15 call 2 ran base = (False, False, 3, 3), before DQ_PAIRS became the default; the
# JSON of that run stores its own table).
VARIANTS = {
    "base": (False, True, 3, 3),
    "dq_single": (False, False, 3, 3),
    "pairs": (True, True, 3, 3),
    "pairs_kv2": (True, True, 2, 3),
    "q4": (False, True, 3, 4),
    "kv2": (False, True, 2, 3),
}


def _set(variant: str) -> None:
    from memattn.backends.triton import hopper, hopper_dq, launch

    kp, qp, ks, qs = VARIANTS[variant]
    hopper.BWD_PAIRS, hopper_dq.DQ_PAIRS = kp, qp
    hopper._BWD_STAGES[128], hopper_dq._DQ_STAGES[128] = ks, qs
    launch._VERSION[0] += 1


def _grads(q, k, v, do, pat):
    import torch

    import memattn

    qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
    out, lse = memattn.attention(qq, kk, vv, pattern=pat, backend="triton", return_lse=True)
    return (out, lse, *torch.autograd.grad(out, (qq, kk, vv), do))


def check(variants: list[str]) -> dict:
    """Bit-identity of every variant against the first on small ragged cases."""
    import torch

    from memattn import patterns as P
    from memattn.backends.triton import launch

    cases = {"window200_n1000": (1000, 1000, 2, P.sliding_window(200)),
             "window130_70_n1023": (1023, 1023, 2, P.sliding_window(130, 70)),
             "docs_causal_n1023": (1023, 1023, 2, P.document([300, 500, 223]) & P.causal()),
             "causal_1000x700": (1000, 700, 2, P.causal()),
             "full_n777_gqa": (777, 777, 1, None),
             "causal_n4096": (4096, 4096, 2, P.causal())}
    res = {}
    g = torch.Generator().manual_seed(5)
    for name, (nq, nk, hkv, pat) in cases.items():
        q = torch.randn(2, 4, nq, 128, generator=g).to("cuda", torch.bfloat16)
        k, v = (torch.randn(2, hkv, nk, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
        do = torch.randn(2, 4, nq, 128, generator=g).to("cuda", torch.bfloat16)
        ref = None
        for vn in variants:
            _set(vn)
            before = launch.launch_counts()["gluon"]
            got = _grads(q, k, v, do, pat)
            n_gluon = launch.launch_counts()["gluon"] - before
            if ref is None:
                ref = got
                res[f"{name}/{vn}"] = {"gluon_launches": n_gluon, "same": True}
                continue
            same = all(torch.equal(a, b) for a, b in zip(ref, got))
            res[f"{name}/{vn}"] = {"gluon_launches": n_gluon, "same": same,
                                   "max_diff": [float((a.float() - b.float()).abs().nan_to_num(0).max())
                                                for a, b in zip(ref, got)]}
            print(f"  check {name} {vn}: same={same} gluon launches={n_gluon}", flush=True)
    return res


def time_case(kind: str, B: int, H: int, N: int, D: int, variants: list[str], rounds: int) -> list[dict]:
    import torch
    from triton.testing import do_bench

    import memattn
    from gpu_profile import kernel_times
    from gpu_triton import _flex_fns, allowed_pairs, flex_setup, flops

    dev = "cuda"
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    mod, pat = flex_setup(kind, N, H, D, dev)
    pairs = allowed_pairs(kind, N, mod, dev)
    _, flex_fb, _ = _flex_fns(kind, q, k, v, do, N, dev)

    def mem():
        memattn.attention(q, k, v, pattern=pat, backend="triton").backward(do)

    names = variants + ["flex"]
    times = {n: [] for n in names}
    kern = {}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else list(reversed(names))):
            if n == "flex":
                fn = flex_fb
            else:
                _set(n)
                fn = mem
            fn()
            times[n].append(float(do_bench(fn, warmup=10, rep=60, grad_to_none=[q, k, v], return_mode="median")))
            if n != "flex" and r == 0:
                kern[n] = {k_: t_ / 1000 for k_, t_ in kernel_times(fn, 3).items() if "hopper" in k_}
    rows = []
    for n in names:
        t = min(times[n])
        rows.append({"kind": kind, "B": B, "H": H, "N": N, "D": D, "impl": n, "fwdbwd_ms": t, "rounds": times[n],
                     "fwdbwd_tflops": flops(B, H, pairs, D, 3.5) / t / 1e9, "kernels_ms": kern.get(n)})
    q.grad = k.grad = v.grad = None
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--budget", type=float, default=400.0)
    p.add_argument("--cases", default="window1024:1:16:65536:128,window1024:1:16:16384:128,"
                   "documents16_causal:1:16:65536:128,causal:1:16:16384:128,full:1:16:16384:128,"
                   "causal:4:16:4096:128,window1024:1:16:131072:128,causal:16:16:1024:128")
    a = p.parse_args(argv)
    import torch

    t0 = time.time()
    variants = a.variants.split(",")
    res: dict = {"env": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()},
                 "variants": {n: VARIANTS[n] for n in variants}}
    res["check"] = check(variants)
    bad = sorted({key.split("/")[1] for key, r in res["check"].items() if not r["same"]})
    res["not_identical"] = bad
    timed = [n for n in variants if n not in bad]
    print(f"check done ({time.time() - t0:.0f} s); not identical: {bad}", flush=True)
    res["timing"] = []
    for spec in a.cases.split(","):
        if time.time() - t0 > a.budget:
            res.setdefault("skipped", []).append(spec)
            continue
        kind, B, H, N, D = spec.split(":")
        res["timing"] += time_case(kind, int(B), int(H), int(N), int(D), timed, a.rounds)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"  {spec} done ({time.time() - t0:.0f} s)", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'case':34s} {'variant':10s} {'f+b ms':>8s} {'vs flex':>7s} {'vs base':>7s}  kernels ms")
    by: dict = {}
    for r in res["timing"]:
        by.setdefault((r["kind"], r["B"], r["N"]), {})[r["impl"]] = r
    for key, d in by.items():
        for n, r in d.items():
            kms = " ".join(f"{k_.split('_')[-2]}={v_:.3f}" for k_, v_ in sorted((r["kernels_ms"] or {}).items()))
            base = d.get(timed[0])
            print(f"{str(key):34s} {n:10s} {r['fwdbwd_ms']:8.3f} {d['flex']['fwdbwd_ms'] / r['fwdbwd_ms']:7.3f} "
                  f"{base['fwdbwd_ms'] / r['fwdbwd_ms'] if base else 0:7.3f}  {kms}")
    print(f"skipped: {res.get('skipped', [])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
