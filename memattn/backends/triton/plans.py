"""Kernel launches of the Triton attention backend: cached launch plans, the direct launcher
that calls a compiled kernel with its arguments bound once, the launch counters and the
compile-only hook. No argument checking here; :mod:`.launch` builds the plans.
"""

from __future__ import annotations

import collections
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
from torch.library import wrap_triton
try:
    from triton import knobs as _knobs          # the launch hooks Triton's own launcher passes on
except ImportError:  # pragma: no cover - Triton < 3.4: no direct launches (see _DIRECT)
    _knobs = None
from torch.utils._python_dispatch import _get_current_dispatch_mode as _get_dispatch_mode

from .configs import TileConfig

_HOOK: list = [None]      # set_launch_hook: replaces the launch (compile-only checks)
_LAST: dict[str, TileConfig] = {}   # the config of the last launch of each kernel
# _Direct launches call CompiledKernel.run, whose calling convention is Triton's own: on by
# default for the Triton version it was written and measured against (3.6), else off;
# MEMATTN_TRITON_DIRECT_LAUNCH=1 / 0 forces it.
_DIRECT = [os.environ.get("MEMATTN_TRITON_DIRECT_LAUNCH",
                          "1" if triton.__version__.split(".")[:2] == ["3", "6"] else "0") != "0"]



def is_interpreter() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    Reads the environment as triton does, in plain Python (torch.compile traces it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def set_launch_hook(hook: Callable | None) -> None:
    """Route every kernel launch to ``hook(kernel, grid, kwargs)`` instead of running it (a
    developer tool: compile-only checks for a GPU target on a machine without one, see
    scripts/gpu_triton.py --aot). None restores normal launches. CPU tensors are accepted
    while a hook is set."""
    _HOOK[0] = hook


class _Direct:
    """One compiled kernel's launcher called with the argument order bound once.

    ``kernel[grid](**kwargs)`` binds and specialises every argument on each call (~60
    arguments, ~0.1 ms of host time per launch on the H200's host). A cached plan fixes
    everything that specialisation looks at except the per-call values, so the launcher of
    the kernel compiled by the first call can be reused as long as each per-call tensor keeps
    the dtype and 16-byte alignment it had then (the only tensor properties Triton specialises
    on); ``__call__`` returns False otherwise and the caller takes Triton's own path.
    Integer arguments that vary per call (the dropout seed) are ``do_not_specialize``.

    The argument list is built once (``template``: the plan's fixed values and the kernel's
    defaults, in kernel order); a call copies it and fills only the ``per_call`` slots (all
    arguments when ``per_call`` is None), which keeps a launch's Python to a few µs.
    """

    __slots__ = ("template", "slots", "tensors", "compiled")

    def __init__(self, kernel, compiled, kwargs: dict, per_call: tuple[str, ...] | None = None) -> None:
        params = kernel.signature.parameters
        names = tuple(params)
        self.template = [kwargs[n] if n in kwargs else params[n].default for n in names]
        for n, v in zip(names, self.template):
            if v is inspect.Parameter.empty:
                raise TypeError(f"kernel argument {n!r} has neither a value nor a default")
        live = set(kwargs) if per_call is None else set(per_call)
        self.slots = tuple((i, n) for i, n in enumerate(names) if n in live and n in kwargs)
        for i, _ in self.slots:      # hold no per-call tensor: the plan outlives the call, and a
            self.template[i] = None  # kept gradient makes autograd copy it instead of taking it
        self.tensors = tuple((n, v.dtype, v.data_ptr() % 16 == 0) for n, v in kwargs.items()
                             if n in live and isinstance(v, torch.Tensor))
        self.compiled = compiled

    def __call__(self, grid: tuple[int, ...], kwargs: dict, device: int) -> bool:
        for n, dt, aligned in self.tensors:
            t = kwargs[n]
            if t.dtype != dt or (t.data_ptr() % 16 == 0) != aligned:
                return False
        args = self.template.copy()
        for i, n in self.slots:
            args[i] = kwargs[n]
        c = self.compiled
        stream = torch._C._cuda_getCurrentRawStream(device)
        g = tuple(grid) + (1,) * (3 - len(grid))
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        meta = c.launch_metadata(g, stream, *args) if enter is not None else None
        c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, meta, enter, leave, *args)
        return True


def _launch(kernel, grid: tuple[int, ...], kwargs: dict, plan: "_Plan | None" = None,
            per_call: tuple[str, ...] | None = None) -> None:
    """Launch ``kernel`` on ``grid`` with ``kwargs``. With a cached ``plan``, ``per_call``
    names the arguments that change between its calls (the others are the plan's own
    objects): only those are checked for trace tensors and rebound by the direct launcher."""
    if _HOOK[0] is not None:
        _HOOK[0](kernel, grid, kwargs)
        return
    vals = kwargs.values() if per_call is None else (kwargs[n] for n in per_call)
    traced = (torch.compiler.is_compiling() or _get_dispatch_mode() is not None
              or any(_is_fake(v) for v in vals if isinstance(v, torch.Tensor)))
    if traced and is_interpreter():
        return  # tracing (fake tensors) with the CPU interpreter: nothing to run, outputs are allocated
    if traced:
        wrap_triton(kernel)[grid](**kwargs)      # recorded in the graph (custom op under torch.compile)
        _COUNTS["traced"] += 1
        return
    # Eager: Triton's own launcher (wrap_triton's eager path dispatches a higher-order op per
    # launch, ~0.5 ms of host time on the H200's host, probe of 2026-11-29), and from the
    # second launch of a plan on, that launcher with the arguments bound once (_Direct).
    if plan is None or is_interpreter():
        kernel[grid](**kwargs)
        _COUNTS["triton"] += 1
        return
    dev = torch.cuda.current_device()
    direct = plan.direct.get(dev)
    if direct is not None and direct(grid, kwargs, dev):
        _COUNTS["direct"] += 1
        return
    compiled = kernel[grid](**kwargs)
    _COUNTS["triton"] += 1
    if direct is None and compiled is not None and _DIRECT[0] and _knobs is not None:
        plan.direct[dev] = _Direct(kernel, compiled, kwargs, per_call)


_COUNTS = {"direct": 0, "triton": 0, "traced": 0}


def launch_counts() -> dict[str, int]:
    """How many kernel launches went through a plan's direct launcher, through Triton's own
    ``kernel[grid]`` (first launches, fallbacks, the interpreter) and through ``wrap_triton``
    (traced), since import (benchmarks record it).

    Example:
        >>> sorted(launch_counts())
        ['direct', 'traced', 'triton']
    """
    return dict(_COUNTS)


def _is_fake(t: torch.Tensor) -> bool:
    """True for a tensor without readable storage: the FakeTensor of a trace, or the
    FunctionalTensor that wraps it under Inductor's functionalisation (any tensor subclass is
    treated so: no cached plan, no data pointer read, no TMA)."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _desc(t: torch.Tensor, rows: int, cols: int, use: bool):
    """A (B, H, N, D) TMA descriptor with [1, 1, rows, cols] blocks, or the tensor itself."""
    if not use:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [1, 1, rows, cols])


# ----------------------------------------------------------------------------- launchers
# A launch plan (validated arguments, strides, scalars, flags, the chosen config) is cached
# per (shapes, strides, dtypes, mask, scalars): a repeated call only allocates the outputs
# and launches. At N = 1k a kernel takes ~0.2 ms, so the Python on the way matters.
_PLANS: "collections.OrderedDict[tuple, _Plan]" = collections.OrderedDict()
_PLAN_CAP = 256


@dataclass
class _Plan:
    kernel: object
    grid: tuple[int, ...]
    static: dict                 # kwargs without the per-call tensors and seed
    cfg: TileConfig
    name: str
    descs: tuple = ()            # (kwarg, tensor kwarg, rows, cols[, use]) of the TMA descriptors
                                 # (use: whether to build one; default the config's tma flag)
    split: int = 1               # forward split-KV programs per (head, query block)
    direct: dict = field(default_factory=dict)   # device index -> _Direct (eager launches)


def _meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


def _cached(key: tuple | None, build: Callable[[], object]):
    if key is None:
        return build()
    plan = _PLANS.get(key)
    if plan is None:
        plan = build()
        _PLANS[key] = plan
        if len(_PLANS) > _PLAN_CAP:
            _PLANS.popitem(last=False)
    return plan


def _run_plan(plan: _Plan, tensors: dict, seed: int) -> None:
    kw = dict(plan.static)
    kw.update(tensors)
    per_call = tuple(tensors)                          # what changes between calls of this plan
    if "seed" in kw:
        kw["seed"] = int(seed) & 0x7FFFFFFF
        per_call += ("seed",)
    for name, src, rows, cols, *use in plan.descs:     # TMA descriptors, or the tensor itself
        kw[name] = _desc(tensors[src], rows, cols, use[0] if use else plan.cfg.tma)
        per_call += (name,)
    first = next(iter(tensors.values()))
    if first.is_cuda and first.device.index != torch.cuda.current_device():
        with torch.cuda.device(first.device):         # Triton launches on the current device
            _launch(plan.kernel, plan.grid, kw, plan, per_call)
    else:
        _launch(plan.kernel, plan.grid, kw, plan, per_call)
    if plan.name != "pre":
        _LAST[plan.name] = plan.cfg
