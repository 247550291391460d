"""Tile-config sweep of the Triton kernels on the dense anchor shapes (one GPU, one call).

    PYTHONPATH=$PWD:$PWD/tests python3 scripts/gpu_tune.py --out $OUT [--budget 480]
        [--extra "dkdv:128,128,8,2;dq:128,128,8,2,tma"] [--dims 128,64] [--ns 1024,4096,16384]
        [--masks full,causal,window1024,documents16_causal]
    python3 scripts/gpu_tune.py --smoke --out /tmp/tune      # CPU interpreter, tiny sizes

Why: the default configs (first entry of each list in ``launch.py``) were chosen offline
(registers, spills) and checked on one shape; the per-call autotuner costs more than a
10-minute device call can carry. This sweep times every candidate of one kernel while the
other two keep their defaults, per (D, N, mask) at B·N = 16384, hidden 2048, bf16:
the forward for ``fwd``, the backward (preprocess + dK/dV + dQ) for ``dkdv`` and ``dq``.
Each candidate first passes the FlashAttention rule (design.md §4) at N = 1024 against the
float64 oracle (``gpu_triton.check_one``); a failing or non-compiling config gets no time.
Every candidate is compiled beforehand in parallel worker processes (Triton's disk cache
is shared), so the timed loop only launches.

With env MEMATTN_BENCH_SUSTAIN_MS=T each candidate first runs back to back for T ms before
it is timed (gpu_triton._sustain): the ranking then reflects the clock the H200's power cap
settles at under that candidate, not the first 50 ms of a cool card.

Prints, per shape and kernel, each candidate's median ms and the best, then a table of the
best configs to paste into ``_GPU16``; writes ``$OUT/tune.json`` after every shape.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

KERNELS = ("fwd", "dkdv", "dq", "dkdva")   # dkdva: the one-pass backward with atomic dQ
# the backward strategy each kernel's timing runs under (launch.set_backward)
MODE = {"fwd": "two_pass", "dkdv": "two_pass", "dq": "two_pass", "dkdva": "atomic"}
MASKS = ("full", "causal", "window1024", "documents16_causal")


def check_pattern(mask: str):
    """A small pattern of the same kernel variant as ``mask``, for the FA-rule check at N = 1024."""
    from memattn import patterns as P

    return {"full": None, "causal": P.causal(), "window1024": P.sliding_window(256),
            "documents16_causal": P.document([256, 300, 468]) & P.causal()}[mask]


def parse_extra(text: str | None) -> dict[str, list[tuple]]:
    """"dkdv:128,128,8,2;dq:64,64,4,3,tma" -> {"dkdv": [(128, 128, 8, 2, False)], ...}."""
    out: dict[str, list[tuple]] = {}
    if not text:
        return out
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        kernel, _, spec = part.partition(":")
        if kernel not in KERNELS:
            raise argparse.ArgumentTypeError(f"--extra: kernel must be one of {KERNELS}, got {kernel!r}")
        f = [x.strip() for x in spec.split(",")]
        if len(f) not in (4, 5) or (len(f) == 5 and f[4] != "tma"):
            raise argparse.ArgumentTypeError(f"--extra: want BM,BN,warps,stages[,tma], got {spec!r}")
        out.setdefault(kernel, []).append((int(f[0]), int(f[1]), int(f[2]), int(f[3]), len(f) == 5))
    return out


def candidate_list(kernel: str, D: int, extra: dict, smoke: bool) -> list[tuple]:
    import torch
    from memattn.backends.triton import launch

    dev = "cpu" if smoke else "cuda"
    base = [tuple(c.__dict__.values()) for c in launch.candidates(kernel, torch.bfloat16, D, dev)]
    return base + [c for c in extra.get(kernel, []) if c not in base]


def _compile_one(args: tuple) -> dict:
    """Worker: run one (kernel, config) once at a small size so it is compiled and cached."""
    kernel, cfg, D, causal, smoke = args
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    t0 = time.time()
    try:
        import torch
        import memattn
        from memattn.backends.triton import launch

        dev, dt = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
        q, k, v = (torch.randn(1, 2, 256, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        with launch.override_configs(**{kernel: launch.TileConfig(*cfg)}), launch.using_backward(MODE[kernel]):
            o = memattn.attention(q, k, v, causal=causal, backend="triton")
            o.backward(torch.ones_like(o))
        return {"kernel": kernel, "cfg": cfg, "D": D, "causal": causal, "status": "ok", "s": time.time() - t0}
    except Exception as e:  # a config that does not compile (shared memory, registers) is recorded
        return {"kernel": kernel, "cfg": cfg, "D": D, "causal": causal, "status": f"{type(e).__name__}: {str(e)[-300:]}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; shapes left when it runs out are skipped")
    ap.add_argument("--extra", type=parse_extra, default={}, help="extra candidates, see the module docstring")
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--ns", default="1024,4096,16384")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--kernels", default="fwd,dkdv,dq", help="comma-separated, among " + ",".join(KERNELS))
    ap.add_argument("--masks", default="full,causal",
                    help="comma-separated, among " + ",".join(MASKS) + " (the timing cases of gpu_triton's sparse section)")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny sizes (checks the script only)")
    a = ap.parse_args(argv)
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import memattn
    from memattn import patterns
    from memattn.backends.triton import describe_mask, launch
    from memattn.backends.triton.function import mask_args

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_triton as gt

    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    dims = [int(x) for x in a.dims.split(",")]
    masks = [x.strip() for x in a.masks.split(",") if x.strip()]
    for x in masks:
        if x not in MASKS:
            raise SystemExit(f"--masks: {x!r} is not one of {MASKS}")
    ns = [int(x) for x in a.ns.split(",")]
    dev, dt = ("cpu", torch.float32) if a.smoke else ("cuda", torch.bfloat16)
    if a.smoke:
        dims, ns = [32], [64]
    kernels = [x.strip() for x in a.kernels.split(",") if x.strip()]
    for x in kernels:
        if x not in KERNELS:
            raise SystemExit(f"--kernels: {x!r} is not one of {KERNELS}")
    cands = {(kern, D): candidate_list(kern, D, a.extra, a.smoke) for kern in kernels for D in dims}

    # 1. compile every candidate in parallel (full and causal specialise differently)
    jobs = [(kern, c, D, causal, a.smoke) for (kern, D), cs in cands.items() for c in cs for causal in (False, True)]
    n_workers = a.workers or max(1, min(len(jobs), (os.cpu_count() or 4) - 2, 14 if not a.smoke else 2))
    with mp.get_context("spawn").Pool(n_workers, maxtasksperchild=4) as pool:
        compiled = pool.map(_compile_one, jobs)
    bad = {(r["kernel"], tuple(r["cfg"]), r["D"]) for r in compiled if r["status"] != "ok"}
    print(f"[{time.time() - t_start:.0f}s] compiled {len(jobs)} kernel variants on {n_workers} processes; "
          f"{len(bad)} failed", flush=True)

    # 2. correctness of every candidate that compiled, per mask's kernel variant: FA rule at
    #    N = 1024 (64 in smoke)
    checked: dict[tuple, str] = {}
    n_chk = 64 if a.smoke else 1024
    for (kern, D), cs in cands.items():
        for c in cs:
            for mask in masks:
                if (kern, c, D) in bad:
                    checked[(kern, c, D, mask)] = "compile failed"
                    continue
                pat = check_pattern(mask)
                with launch.using_backward(MODE[kern]):
                    row = gt.check_one({"nq": n_chk, "nk": n_chk, "d": D}, dev, dt, H=4, Hkv=2,
                                       configs={kern: launch.TileConfig(*c)},
                                       pattern=pat)
                checked[(kern, c, D, mask)] = row.get("status", "?")

    # 3. time: each candidate of one kernel, the others at their defaults
    result = {"env": {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                      "sustain_ms": float(os.environ.get("MEMATTN_BENCH_SUSTAIN_MS", "0"))},
              "compiled": compiled, "checked": {f"{k[0]} {k[1]} D={k[2]}": v for k, v in checked.items()},
              "rows": []}
    best_rows = []
    for D in dims:
        for N in ns:
            for mask in masks:
                if time.time() - t_start > a.budget:
                    print(f"budget: skipped D={D} N={N} {mask}", flush=True)
                    continue
                B, H = max(1, 16384 // N), max(1, 2048 // D)
                if a.smoke:
                    B, H = 1, 2
                q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(3))
                pat = gt.flex_setup(mask, N, H, D, dev)[1]
                out, lse = memattn.attention(q, k, v, pattern=pat, backend="triton", return_lse=True)
                do = torch.randn_like(out)
                m = mask_args(describe_mask(pat, q, k))
                scale = D ** -0.5
                for kern in kernels:
                    times = {}
                    for c in cands[(kern, D)]:
                        if checked.get((kern, c, D, mask)) != "ok":
                            times[c] = None
                            continue
                        with launch.override_configs(**{kern: launch.TileConfig(*c)}), \
                                launch.using_backward(MODE[kern]):
                            if kern == "fwd":
                                def f():
                                    launch.forward(q, k, v, m, scale=scale)
                            else:
                                def f():
                                    launch.backward(q, k, v, out, do, lse, m, scale=scale)
                            try:
                                f()
                                times[c] = gt._bench(f, a.smoke)
                            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                                times[c] = None
                                print(f"  {kern} {c}: {type(e).__name__}: {str(e)[-200:]}", flush=True)
                    ok = {c: t for c, t in times.items() if t is not None}
                    best = min(ok, key=ok.get) if ok else None
                    # the launcher's own default for this shape and mask (short / band tables)
                    default = tuple(launch.candidates(kern, dt, D, dev, None, N, N,
                                                           mask in ("window1024", "documents16_causal"))[0].__dict__.values())
                    row = {"D": D, "N": N, "mask": mask, "kernel": kern,
                           "ms": {",".join(map(str, c)): t for c, t in times.items()},
                           "best": best, "default": default,
                           "gain_vs_default": (ok[default] / ok[best]) if best and default in ok else None}
                    if kern == "dkdva" and best:   # the best one with the whole accumulator at once
                        with launch.override_configs(dkdva=launch.TileConfig(*best)), \
                                launch.using_backward("atomic", dq_memory=1.0):
                            launch.backward(q, k, v, out, do, lse, m, scale=scale)
                            row["best_ms_one_chunk"] = gt._bench(
                                lambda: launch.backward(q, k, v, out, do, lse, m, scale=scale), a.smoke)
                    result["rows"].append(row)
                    best_rows.append(row)
                    print(f"D={D} N={N} {mask} {kern}: "
                          + ", ".join(f"{','.join(map(str, c))}={'-' if t is None else f'{t:.3f}'}"
                                      for c, t in times.items())
                          + f"  best {best} ({row['gain_vs_default'] or float('nan'):.3f}x default)"
                          + (f" one chunk {row['best_ms_one_chunk']:.3f}" if "best_ms_one_chunk" in row else ""),
                          flush=True)
                (a.out / "tune.json").write_text(json.dumps(result, indent=1, default=str))
    print("\nbest config per shape (ms ratio default / best):")
    for r in best_rows:
        print(f"  D={r['D']:>3} N={r['N']:>6} {r['mask']:<18} {r['kernel']:<5} "
              f"best={r['best']} default={r['default']} x{r['gain_vs_default'] or float('nan'):.3f}")
    print(f"wrote {a.out / 'tune.json'} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
