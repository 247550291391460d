"""Helpers of the compile-only sm_90 tests (tests/test_triton_aot.py, tests/test_hopper.py):
a script that compiles kernels for an sm_90 target runs in a subprocess, without the CPU
interpreter, so the driver stub it installs (memattn.backends.triton.aot) stays out of this
process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ptxas_present() -> bool:
    """Whether Triton's bundled ptxas is there (some Triton wheels leave it out)."""
    from memattn.backends.triton.aot import ptxas_path

    return os.path.exists(ptxas_path())


needs_ptxas = pytest.mark.skipif(not ptxas_present(),
                                 reason="Triton's bundled ptxas is missing (needed to compile for sm_90)")


def run_compile_script(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` with ``python -c`` from the repository root, TRITON_INTERPRET unset;
    fails the test with its output if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p
