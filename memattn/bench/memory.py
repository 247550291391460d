"""Peak memory: measured (CUDA allocator; peak RSS of a worker process on the CPU) and predicted.

What is measured
----------------
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  what was allocated before the call (the inputs): the attention's own memory.
* CPU: the process's resident-set high-water mark (``VmHWM``), reset before each
  measurement by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0), minus the RSS
  before the call after ``malloc_trim(0)`` has handed freed heap pages back. Runs happen in
  a fresh worker subprocess (``python -m memattn.bench.worker``), warmed up on a tiny
  shape first so that code pages and thread pools are not counted. Where clear_refs is
  unavailable, a 1 ms sampling thread stands in for the kernel's high-water mark.
* Budgets on the CPU are enforced by measurement, not by ``RLIMIT_AS`` (torch reserves
  far more address space than it touches): a watchdog thread in the worker reads the RSS
  every few milliseconds and ends the process with exit code 75 when its growth above the
  worker's baseline exceeds the budget; the case becomes a row marked ``oom``.

MiB = 2**20 bytes throughout.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

import torch

from .cases import Case

__all__ = ["Meter", "Watchdog", "BUDGET_EXIT", "trim", "rss_bytes", "predict", "available_memory",
           "default_cpu_budget", "block_map_bytes"]

BUDGET_EXIT = 75  # worker exit code: the memory budget was exceeded
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIBC = None


def trim() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``; no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Peak-memory meter for one device.

    ``start()`` frees what can be freed, resets the peak and returns the current
    footprint; ``peak()`` returns the peak since ``start()``. Both in bytes.

    Example:
        >>> m = Meter("cpu"); base = m.start()
        >>> x = torch.ones(2**22)  # 16 MiB
        >>> m.peak() - base >= 15 * 2**20
        True
    """

    def __init__(self, device: str) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self._sampler: threading.Thread | None = None
        self._sampled = 0
        self._stop = threading.Event()
        self.method = "cuda.max_memory_allocated" if device == "cuda" else (
            "VmHWM after clear_refs" if _reset_hwm() and _hwm_bytes() is not None else "RSS sampled every 1 ms")

    def current(self) -> int:
        if self.device == "cuda":
            return int(torch.cuda.memory_allocated())
        return rss_bytes()

    def start(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self.current()
        trim()
        now = rss_bytes()
        if self.method.startswith("VmHWM"):
            _reset_hwm()
        else:
            self._start_sampler(now)
        return now

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        if self.method.startswith("VmHWM"):
            return max(_hwm_bytes() or 0, rss_bytes())
        return max(self._sampled, rss_bytes())

    def _start_sampler(self, now: int) -> None:
        self._sampled = now
        if self._sampler is None:
            def loop() -> None:
                while not self._stop.is_set():
                    self._sampled = max(self._sampled, rss_bytes())
                    time.sleep(0.001)
            self._sampler = threading.Thread(target=loop, daemon=True)
            self._sampler.start()


class Watchdog:
    """Ends the process (exit code :data:`BUDGET_EXIT`) when RSS growth above ``base`` exceeds ``budget``.

    Before exiting it writes one protocol line naming the peak seen, so the parent can
    mark the running case ``oom``. Polls every ``interval`` seconds (torch releases the
    GIL inside its kernels, so the thread runs while they do).
    """

    def __init__(self, budget: int, base: int | None = None, interval: float = 0.003,
                 write=None) -> None:
        self.budget = int(budget)
        self.base = rss_bytes() if base is None else int(base)
        self.interval = interval
        self._write = write
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            grown = rss_bytes() - self.base
            if grown > self.budget:
                if self._write is not None:
                    try:
                        self._write({"event": "budget", "grown": grown, "budget": self.budget})
                    finally:
                        os._exit(BUDGET_EXIT)
                os._exit(BUDGET_EXIT)
            time.sleep(self.interval)


def available_memory() -> int:
    """Bytes of RAM available now (psutil; /proc/meminfo fallback)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 8 * 2**30


def default_cpu_budget() -> int:
    """60 % of the memory available now: the CPU default for a case (the machine is shared)."""
    return int(0.6 * available_memory())


# ---------------------------------------------------------------------------- predicted
def _es(case: Case) -> int:
    return torch.empty((), dtype=getattr(torch, case.dtype)).element_size()


def block_map_bytes(case: Case, block_q: int = 128, block_k: int = 128) -> int:
    """Bytes of the case's BlockMap (CSR arrays plus the padded views), 0 without a pattern."""
    spec = case.pattern_spec
    if spec is None:
        return 0
    try:
        bm = spec.build(case.n).block_map(case.q_len, case.n, block_q, block_k)
    except NotImplementedError:
        return 0
    total = 0
    for name in ("row_ptr", "col", "full", "kv_counts", "kv_indices", "kv_full"):
        t = getattr(bm, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def predict(case: Case) -> dict[str, int | None]:
    """Memory predicted from shapes, in bytes, by category.

    Keys: ``inputs`` (q, k, v), ``outputs`` (out, plus lse for memattn), ``saved`` (kept
    for the backward beyond inputs and outputs), ``workspace_fwd`` (transient peak of
    the forward beyond outputs), ``grads`` (dq, dk, dv), ``workspace_bwd`` (transient
    peak of the backward beyond saved tensors and grads), ``block_map``, and the totals
    ``fwd_peak`` (inference, above inputs) and ``train_peak`` (forward + backward, above
    inputs and dout). None where no model exists (approximate mechanisms).

    The models: memattn and SDPA's flash-style kernels keep O(N) state (output, lse, the
    backward's row statistics, a float32 dQ accumulator for half inputs) plus a few score
    tiles of 2 MiB; naive attention
    holds about two (B, H, Nq, Nk) score arrays in the forward (scores and the masked copy
    or softmax) and three at the peak of the backward (the saved probabilities, their
    gradient and the softmax gradient), plus one byte per pair for a mask.

    Example:
        >>> p = predict(Case("naive", 1024, heads=1))
        >>> p["fwd_peak"] // 2**20
        8
    """
    es = _es(case)
    B, Hq, Hkv, nq, nk, D = case.batch, case.heads, case.hkv, case.q_len, case.n, case.d
    inputs = es * B * D * (Hq * nq + 2 * Hkv * nk)
    out = es * B * Hq * nq * D
    grads = inputs
    bmap = block_map_bytes(case)
    masked = case.pattern is not None or (case.causal and not case.is_decode)
    r: dict[str, int | None] = {"inputs": inputs, "block_map": bmap, "grads": grads}
    if case.impl in ("memattn", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"):
        tile = 2 * 2**20
        lse = 4 * B * Hq * nq
        dq32 = D if es < 4 else 0  # a float32 dQ accumulator for half inputs
        r.update(outputs=out + lse, saved=0, workspace_fwd=4 * tile + 4 * B * Hq * min(nq, 256) * (D + 2),
                 workspace_bwd=6 * tile + 4 * B * Hq * nq * (1 + dq32))
    elif case.impl in ("naive", "sdpa-math"):
        pairs = B * Hq * nq * nk
        mask = nq * nk if masked else 0
        r.update(outputs=out, saved=pairs * max(es, 4) + mask,
                 workspace_fwd=2 * pairs * max(es, 4) + 2 * mask,
                 workspace_bwd=2 * pairs * max(es, 4))
    else:
        r.update(outputs=out, saved=None, workspace_fwd=None, workspace_bwd=None)
    if r["workspace_fwd"] is None:
        r["fwd_peak"] = r["train_peak"] = None
    else:
        r["fwd_peak"] = r["outputs"] + r["workspace_fwd"] + bmap
        r["train_peak"] = r["outputs"] + r["saved"] + r["grads"] + r["workspace_bwd"] + bmap
    return r



# ----------------------------------------------------------------------------- measured
def measure_breakdown(case: Case, meter: Meter | None = None) -> dict[str, float | str | None]:
    """Measure a case's memory by category, in this process (run it in a fresh worker).

    Sequence (each step's growth read after ``malloc_trim`` on the CPU, from the CUDA
    allocator on the GPU): build the block map (``block_map``); make q, k, v and dout
    (``inputs``); forward under no_grad: what stays is ``outputs``, the rest of its peak is
    ``workspace_fwd``; forward with autograd: what stays beyond the outputs is ``saved``;
    backward: what stays is ``grads``, the rest of its peak ``workspace_bwd``. Totals
    ``fwd_peak`` (inference) and ``train_peak`` (forward+backward) are above the inputs.
    All values in bytes.

    Example:
        >>> r = measure_breakdown(Case("naive", 256, d=16, heads=2))
        >>> r["status"], r["train_peak"] > 0
        ('ok', True)
    """
    from .peers import Unavailable, Unsupported, make_inputs, prepare
    from .runner import _warmup, is_oom_error

    meter = meter or Meter(case.device)
    r: dict[str, float | str | None] = {"status": "ok", "reason": "", "method": meter.method}
    try:
        _warmup(case)
        r0 = meter.start()
        bm = None
        if case.pattern_spec is not None:
            bm = case.pattern_spec.build(case.n).block_map(case.q_len, case.n, 128, 128)
            _ = bm.kv_indices, bm.kv_full
        r1 = meter.current()
        q, k, v = make_inputs(case, requires_grad=True)
        dout = torch.randn(case.batch, case.heads, case.q_len, case.d, dtype=q.dtype, device=q.device)
        r2 = meter.start()
        r["block_map"], r["inputs"] = r1 - r0, r2 - r1
        p = prepare(case, q, k, v)
        with p.context():
            with torch.no_grad():
                out = p.fn()
            peak = meter.peak()
            out_keep = meter.start() - r2
            r["outputs"], r["workspace_fwd"], r["fwd_peak"] = out_keep, peak - r2 - out_keep, peak - r2
            out = None
            meter.start()
            out = p.fn()
            peak_f = meter.peak()
            held = meter.start() - r2
            r["saved"] = held - out_keep
            out.backward(dout)
            out = None
            peak_b = meter.peak()
            grads = meter.start() - r2
            r["grads"] = grads
            r["workspace_bwd"] = max(0, peak_b - r2 - held - grads)
            r["train_peak"] = max(peak_f, peak_b) - r2
    except Unavailable as e:
        r.update(status="unavailable", reason=str(e))
    except Unsupported as e:
        r.update(status="unsupported", reason=str(e))
    except Exception as e:  # noqa: BLE001
        r.update(status="oom" if is_oom_error(e) else "error", reason=str(e).splitlines()[0][:200] if str(e) else
                 type(e).__name__)
    return r


def measure_probe(case: Case, passes: str = "fwd+bwd", watchdog: "Watchdog | None" = None) -> dict[str, float | str]:
    """Run a case once (forward, or forward+backward) and report its peak above the
    memory in use before the inputs were made (inputs included), in bytes. A watchdog,
    if given, is re-based there (after the warm-up), so its budget covers the same bytes."""
    from .peers import make_inputs, prepare
    from .runner import _warmup, is_oom_error

    meter = Meter(case.device)
    r: dict[str, float | str] = {"status": "ok", "reason": "", "method": meter.method}
    try:
        if watchdog is not None:
            # The warm-up's one-off allocations (tens of MiB on a fresh install) are not the
            # probe's: hold the watchdog off until it is re-based after them.
            watchdog.base = 1 << 62
        _warmup(case)
        base = meter.start()
        if watchdog is not None:
            watchdog.base = base
        q, k, v = make_inputs(case, requires_grad=passes == "fwd+bwd")
        p = prepare(case, q, k, v)
        with p.context():
            if passes == "fwd":
                with torch.no_grad():
                    p.fn()
            else:
                out = p.fn()
                out.backward(torch.ones_like(out))
                out = None
        r["peak"] = meter.peak() - base
    except Exception as e:  # noqa: BLE001
        r.update(status="oom" if is_oom_error(e) else "error", reason=str(e).splitlines()[0][:200])
    return r
