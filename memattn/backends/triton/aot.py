"""Compile-only checks for sm_90 on a machine without a GPU (developers, CI).

Triton compiles for a target its active driver names; :func:`use_sm90_target` installs a
driver stub that names an sm_90 GPU, so ``kernel.warmup(...)`` builds PTX and a cubin with
Triton's bundled ptxas on a CPU-only machine. :func:`ptxas_info` reads ptxas' resource report
of that PTX. The stub must not leak into code that launches kernels: the tests run these checks
in a subprocess, and the scripts only in their compile-only modes (``gpu_triton.py --aot``,
``benchmarks/experiments/gluon_fwd.py --compile-only``).
"""

from __future__ import annotations

import os
import re
import subprocess

__all__ = ["use_sm90_target", "ptxas_path", "ptxas_info"]


def use_sm90_target() -> None:
    """Make Triton compile for an sm_90 GPU (capability 9.0, warp size 32) from here on.

    Example:
        >>> # in a subprocess: use_sm90_target(); ck = kernel.warmup(*args, grid=(1,)); ck.asm["ptx"]
    """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _Target:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Target())


def ptxas_path() -> str:
    """Triton's bundled ptxas (it may be missing from a Triton wheel: check ``os.path.exists``)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_info(ptx: str, arch: str = "sm_90a") -> dict:
    """ptxas' report of one kernel's PTX.

    Args:
        ptx: the PTX text (``compiled.asm["ptx"]``).
        arch: the target (default sm_90a, what Triton compiles Hopper kernels for).
    Returns:
        {"ok": exit status 0, "regs": registers or None, "spill": spill-store bytes or None,
        "serialised": whether ptxas serialised the wgmma instructions (warning C7515),
        "stderr": the report}.
    """
    p = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", "-", "-o", os.devnull], input=ptx,
                       capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", p.stderr)
    spill = re.search(r"(\d+) bytes spill stores", p.stderr)
    return {"ok": p.returncode == 0, "regs": int(regs.group(1)) if regs else None,
            "spill": int(spill.group(1)) if spill else None, "serialised": "C7515" in p.stderr,
            "stderr": p.stderr}
