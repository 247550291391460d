"""Diagnostics for two measured gaps of the Triton backend (H200, one GPU), one short run.

    PYTHONPATH=$PWD python3 scripts/gpu_probe.py --out $OUT

1. Sparse: where the time of block-map launches goes. Longformer at N = 65536 (B=1, H=16,
   D=128) ran at 25 TFLOP/s against BigBird's 127 and the window's 292: time the forward of
   the same band with and without global tokens, with 128x128 and 64x64 map tiles, and the
   band alone forced through the block map, so the cost of bit tiles, of the one long global
   row and of the map path itself separate.
2. Dense N = 1024: host time per call (calls enqueued back to back, no sync) against the
   device time (do_bench median), for memattn, SDPA flash and cuDNN: a call is host-bound
   when its host time is the larger.

Prints a table; writes $OUT/probe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import memattn
from memattn import patterns as P
from memattn.backends.triton import describe_mask
from memattn.backends.triton.function import attention as tri_attention, mask_args


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def sparse_rows(N: int = 65536, H: int = 16, D: int = 128) -> list[dict]:
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases = [
        ("longformer 512 + 16 globals, 128x128 map", P.longformer(512, list(range(16))), None),
        ("longformer 512 + 16 globals, 64x64 map", P.longformer(512, list(range(16))), ((64, 64),)),
        ("longformer 512, no globals, 128x128 map", P.longformer(512, []), ((128, 128),)),
        ("band |q-k|<=256 via mask_mod, 128x128 map", P.from_mask_mod(lambda b, h, i, j: (i - j).abs() <= 256),
         ((128, 128),)),
        ("globals only rows/cols 16, 128x128 map", P.global_tokens(list(range(16))), ((128, 128),)),
        ("bigbird default, 64x64 map", P.bigbird(), None),
    ]
    rows = []
    for name, pat, blocks in cases:
        row = {"case": name, "N": N}
        try:
            t0 = time.time()
            spec = describe_mask(pat, q, k, **({"map_blocks": blocks} if blocks else {}))
            torch.cuda.synchronize()
            row["build_s"] = time.time() - t0
            row["path"] = spec.path
            row["info"] = {a: b for a, b in spec.info.items() if a in ("tiles", "masked_tiles", "map_block")}
            m = mask_args(spec)
            f = lambda: tri_attention(q, k, v, m, scale=D ** -0.5)  # noqa: E731
            f()
            row["fwd_ms"] = _ms(f)
            tiles = row["info"].get("tiles")
            if tiles:
                row["us_per_tile_per_head_on_132_SMs"] = row["fwd_ms"] * 1e3 * 132 / (tiles * H)
        except Exception as e:  # reported, never fatal
            row["status"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def host_rows() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for D in (128, 64):
        H, B, N = 2048 // D, 16, 1024
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for causal in (False, True):
            impls = {"memattn": lambda: memattn.attention(q, k, v, causal=causal, backend="triton")}
            for nm, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                def g(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                impls[nm] = g
            for nm, f in impls.items():
                for mode, fn in (("fwd", f), ("fwdbwd", lambda f=f: f().backward(do))):
                    fn()
                    torch.cuda.synchronize()
                    n = 50
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    host = (time.perf_counter() - t0) / n * 1e3
                    torch.cuda.synchronize()
                    dev = _ms(fn)
                    row = {"D": D, "causal": causal, "impl": nm, "mode": mode, "host_ms": host, "bench_ms": dev}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    q.grad = k.grad = v.grad = None
    return rows


def host_profile() -> str:
    """cProfile of 200 eager forward+backward calls at N = 1024 (D=128, causal): where the
    host time goes."""
    import cProfile
    import io
    import pstats

    q, k, v = (torch.randn(16, 16, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    for _ in range(3):
        memattn.attention(q, k, v, causal=True, backend="triton").backward(do)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        memattn.attention(q, k, v, causal=True, backend="triton").backward(do)
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(14)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "sparse": sparse_rows(), "host": host_rows()}
    res["profile"] = host_profile()
    (a.out / "probe.json").write_text(json.dumps(res, indent=1))
    print(res["profile"])
    print("\ncase | path | tiles (masked) | fwd ms | µs per tile-head on 132 SMs")
    for r in res["sparse"]:
        info = r.get("info", {})
        print(f"{r['case']} | {r.get('path')} | {info.get('tiles')} ({info.get('masked_tiles')})"
              f" | {r.get('fwd_ms', r.get('status'))} | {r.get('us_per_tile_per_head_on_132_SMs', '-')}")
    print("\nD causal impl mode | host ms/call | do_bench ms")
    for r in res["host"]:
        print(f"{r['D']} {r['causal']} {r['impl']} {r['mode']} | {r['host_ms']:.3f} | {r['bench_ms']:.3f}")


if __name__ == "__main__":
    main()
