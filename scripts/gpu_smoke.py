"""First look on the GPU: does the Triton backend compile and agree with the reference on
Hopper, and where does it stand against SDPA / FlexAttention? (Small, < 3 minutes.)

Run: PYTHONPATH=$PWD python3 scripts/gpu_smoke.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    import triton
    import memattn
    from triton.testing import do_bench
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    dev = "cuda"
    # correctness
    for D in (64, 128, 256, 59):
        for causal in (False, True):
            try:
                torch.manual_seed(0)
                B, H, N = 2, 4, 1000
                q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                o = memattn.attention(q, k, v, causal=causal, backend="triton")
                do = torch.randn_like(o)
                g = torch.autograd.grad(o, (q, k, v), do)
                qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
                of = memattn.attention(qf, kf, vf, causal=causal, backend="reference")
                gf = torch.autograd.grad(of, (qf, kf, vf), do.float())
                errs = [(o.float() - of).abs().max().item()] + [(x.float() - y).abs().max().item() for x, y in zip(g, gf)]
                print(f"D={D} causal={causal} err out/dq/dk/dv = " + " ".join(f"{e:.3g}" for e in errs), flush=True)
                rows.append(dict(kind="check", D=D, causal=causal, errs=errs))
            except Exception as e:
                traceback.print_exc()
                rows.append(dict(kind="check", D=D, causal=causal, error=repr(e)[:300]))
    # timing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except Exception:
        flex = None
    for D in (128, 64):
        for N in (4096, 16384):
            for causal in (False, True):
                H, B = 2048 // D, 16384 // N
                q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                do = torch.randn_like(q)
                pairs = N * (N + 1) / 2 if causal else N * N
                fl = 4 * B * H * pairs * D
                impls = {
                    "memattn": lambda: memattn.attention(q, k, v, causal=causal, backend="triton"),
                }
                for nm, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def f(be=be):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    impls[nm] = f
                if flex is not None:
                    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N, device=dev, _compile=True) if causal else None
                    impls["flex"] = lambda bm=bm: flex(q, k, v, block_mask=bm)
                res = {}
                for nm, f in impls.items():
                    try:
                        tf = do_bench(f, warmup=25, rep=100, return_mode="median")
                        def fb(f=f):
                            o = f()
                            o.backward(do)
                        tb = do_bench(fb, warmup=25, rep=100, return_mode="median", grad_to_none=[q, k, v])
                        res[nm] = (fl / tf / 1e9, 3.5 * fl / tb / 1e9)
                    except Exception as e:
                        res[nm] = repr(e)[:120]
                line = f"D={D} N={N} causal={causal}: " + "  ".join(
                    f"{nm} {v[0]:.0f}/{v[1]:.0f}" if isinstance(v, tuple) else f"{nm} ERR {v}" for nm, v in res.items())
                print(line, flush=True)
                rows.append(dict(kind="time", D=D, N=N, causal=causal, tflops=res))
    with open(os.path.join(a.out, "smoke.json"), "w") as fh:
        json.dump(rows, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
