"""Where the one synchronising CUDA call of memattn's window forward+backward happens (session 13).

    PYTHONPATH=$PWD:$PWD/tests:$PWD/scripts python3 benchmarks/experiments/sync_trace_probe.py

do_bench_gap_probe.py counted one synchronising call per forward+backward at the 64k window
and none for the documents. This runs one warm forward+backward of each case with
``torch.cuda.set_sync_debug_mode("error")`` and prints the stack of the call that raises.
"""

from __future__ import annotations

import traceback


def main() -> int:
    import torch

    import gpu_profile as gp
    import gpu_triton as gt
    import memattn

    for name in ("window1024", "documents16"):
        kind, B, H, N, D = gp.CASES[name]
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        _, pat = gt.flex_setup(kind, N, H, D, "cuda")
        print(f"-- {name}: pattern {pat!r}")
        for phase in ("forward", "backward"):
            memattn.attention(q, k, v, pattern=pat, backend="triton").backward(do)   # warm
            torch.cuda.synchronize()
            out = None
            try:
                if phase == "forward":
                    torch.cuda.set_sync_debug_mode("error")
                out = memattn.attention(q, k, v, pattern=pat, backend="triton")
                torch.cuda.set_sync_debug_mode("error")
                out.backward(do)
                print(f"   {phase}: no synchronising call")
            except RuntimeError:
                print(f"   {phase}: synchronising call at\n" + "".join(traceback.format_exc().splitlines(True)[-14:]))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
