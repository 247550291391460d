"""The Triton kernels compile for sm_90 with the argument types torch.compile gives them.

Inductor passes a user kernel's Python floats as fp64 and its integer arguments equal to 1 as
constexprs; the launcher passes fp32 and i32. A kernel whose loop-carried values mix the two
fails to compile only under torch.compile, on the GPU (seen on the H200, 2026-11-29). This
test compiles the forward, preprocess, dK/dV and dQ kernels ahead of time for sm_90 on a
machine without a GPU (Triton's bundled ptxas), with both argument typings, in a subprocess
(the fake GPU driver it installs must not leak into other tests).
"""

from __future__ import annotations

import textwrap

import pytest

triton = pytest.importorskip("triton")

from _sm90 import needs_ptxas, run_compile_script  # noqa: E402  (tests/ is on sys.path)

SCRIPT = textwrap.dedent('''
    import sys, torch
    from triton.backends.compiler import GPUTarget
    from memattn.backends.triton.aot import use_sm90_target

    use_sm90_target()
    import triton
    from triton.compiler import ASTSource
    from memattn import patterns as P
    from memattn.backends.triton import function, launch, masks

    failures, seen = [], []

    def hook(kernel, grid, kw):
        ck = kernel.warmup(grid=grid, **kw)                      # the launcher's own typing
        sig, consts = dict(ck.src.signature), dict(ck.src.constants)
        for k in ("s_in", "s_out", "drop_scale", "scale"):
            if k in sig:
                sig[k] = "fp64"                                  # Inductor: Python floats as fp64
        for k, v in kw.items():
            if k in sig and sig[k] in ("i32", "i64") and not isinstance(v, bool) and v == 1:
                sig[k] = "constexpr"                             # Inductor: ints equal to 1
                consts[(kernel.arg_names.index(k),)] = 1
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=ck.src.attrs)
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": ck.metadata.num_warps, "num_stages": ck.metadata.num_stages})
            seen.append(kernel.fn.__name__)
        except Exception as e:
            failures.append(f"{kernel.fn.__name__}: {type(e).__name__}: {str(e)[-400:]}")

    launch.set_launch_hook(hook)
    for pat in (P.causal(), P.bigbird()):                        # parametric path, block-map path
        q = torch.empty(1, 2, 256, 64, dtype=torch.bfloat16)
        spec = masks.describe(pat, 256, 256, 2, "cpu", map_blocks=launch.map_blocks_for(torch.device("cuda")))
        m = function.mask_args(spec)
        out, lse = launch.forward(q, q, q, m, scale=0.125)
        launch.backward(q, q, q, out, out, lse.float(), m, scale=0.125)
        # with an lse gradient the preprocessing kernel runs (the default folds it into dQ)
        launch.backward(q, q, q, out, out, lse.float(), m, scale=0.125, dlse=lse.float())
    # split-KV forward (decoding): one query against 4096 keys, 4 splits
    q1, kv = torch.empty(1, 2, 1, 64, dtype=torch.bfloat16), torch.empty(1, 2, 4096, 64, dtype=torch.bfloat16)
    m1 = function.mask_args(masks.describe(P.causal(), 1, 4096, 2, "cpu"))
    with launch.force_kv_splits(4):
        launch.forward(q1, kv, kv, m1, scale=0.125)
    print("compiled:", sorted(set(seen)))
    if failures:
        print("\\n".join(failures))
        sys.exit(1)
''')


@needs_ptxas
def test_kernels_compile_with_inductor_argument_types():
    p = run_compile_script(SCRIPT)
    for name in ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        assert name in p.stdout, p.stdout[-2000:]
