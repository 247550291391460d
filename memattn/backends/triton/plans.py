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

    When the compiled launcher has the layout of Triton 3.6 (:func:`_raw_launcher`) and no
    launch hook is set, the call goes to the C launcher inside it (``raw``, a
    :class:`_RawLaunch`). TMA arguments (host tensor descriptors) are then expanded here:
    Triton's wrapper encodes a CUtensorMap for each on every call, behind a Python loop over
    all the arguments and a ``TensorDescriptor`` built per call (~0.035 ms per descriptor on
    the H200's host, session 11); this launcher expands them as Triton's
    ``make_tensordesc_arg`` does and keeps each map per (address, shape, strides), on which
    alone it depends for a given compiled kernel. A descriptor slot then takes the tensor
    itself or a ``TensorDescriptor``.
    """

    __slots__ = ("template", "slots", "tensors", "compiled", "raw")

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
        self.raw = _RawLaunch.build(compiled, self.template, self.slots) if _RAW[0] else None

    def __call__(self, grid: tuple[int, ...], kwargs: dict, device: int) -> bool:
        for n, dt, aligned in self.tensors:
            t = kwargs[n]
            if t.dtype != dt or (t.data_ptr() % 16 == 0) != aligned:
                return False
        c = self.compiled
        stream = torch._C._cuda_getCurrentRawStream(device)
        g = tuple(grid) + (1,) * (3 - len(grid))
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        idle = _idle(enter) and _idle(leave)
        if self.raw is not None and idle:
            self.raw(g, stream, c, kwargs)
            return True
        args = self.template.copy()
        for i, n in self.slots:
            args[i] = kwargs[n]
        if idle:              # no hook to call: no launch metadata to build either
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, None, None, None, *args)
        else:
            meta = c.launch_metadata(g, stream, *args)
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, meta, enter, leave, *args)
        return True


def _idle(hook) -> bool:
    """Whether a Triton launch hook would call nothing: None, or (Triton 3.6, where the knob is
    always a ``HookChain``) a chain without hooks."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


# MEMATTN_TRITON_RAW_LAUNCH=0: direct launches go through Triton's CudaLauncher (its scratch
# allocation and descriptor handling) instead of the C launcher inside it (A/B)
_RAW = [os.environ.get("MEMATTN_TRITON_RAW_LAUNCH", "1") != "0"]
_DESC_CACHE_CAP = 16           # encoded maps kept per descriptor slot (cleared when full)


def _raw_launcher(compiled):
    """(raw launcher, tensor-descriptor argument indices, their encodings (swizzle, element
    size, host dtype code, block shape), cooperative flag, PDL flag) of a compiled kernel whose
    launcher has the layout of Triton 3.6's ``CudaLauncher``: its C launcher, wrapped in
    ``wrap_handle_tensordesc`` when the kernel takes descriptors. None for any other layout and
    for kernels needing global or profile scratch (the raw call passes none)."""
    run = compiled.run
    fn = getattr(run, "launch", None)
    if fn is None or not hasattr(run, "launch_cooperative_grid") or not hasattr(run, "launch_pdl"):
        return None
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None:                     # no descriptor: the C launcher itself
        return (fn, (), (), run.launch_cooperative_grid, run.launch_pdl) if callable(fn) else None
    if cells is None:
        return None
    free = dict(zip(code.co_freevars, (c.cell_contents for c in cells)))
    raw, idx, metas = free.get("launcher"), free.get("tensordesc_indices"), free.get("tensordesc_meta")
    if raw is None or not idx or metas is None or len(metas) != len(idx):
        return None
    if any(m is None or m.get("fp4_padded") for m in metas):
        return None
    try:
        from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST as to_host
    except ImportError:  # pragma: no cover - another Triton layout
        return None
    encs = tuple((m["swizzle"], m["elem_size"], to_host[m["elem_type"]], list(m["block_size"])) for m in metas)
    return raw, tuple(sorted(idx)), encs, run.launch_cooperative_grid, run.launch_pdl


def _fill_tma():
    """Triton's CUtensorMap encoder of the active driver (looked up per use: tests swap it)."""
    return triton.runtime.driver.active.utils.fill_tma_descriptor


class _RawLaunch:
    """The call of a compiled kernel's C launcher, with its tensor descriptors expanded here
    (see :class:`_Direct`). ``final``: the launcher's argument list with each descriptor argument
    replaced by its ``1 + 2 * rank`` expanded values; ``slots``: (position in ``final``,
    kwarg) of the other per-call arguments; ``descs``: (position, width, kwarg, encoding,
    cache) of the descriptor arguments."""

    __slots__ = ("raw", "final", "slots", "descs", "coop", "pdl")

    @staticmethod
    def build(compiled, template: list, slots: tuple) -> "_RawLaunch | None":
        got = _raw_launcher(compiled)
        if got is None:
            return None
        raw, idx, encs, coop, pdl = got
        per_call = dict(slots)
        if any(i not in per_call for i in idx):      # a descriptor fixed in the plan: not handled
            return None
        self = _RawLaunch()
        self.raw, self.coop, self.pdl = raw, coop, pdl
        final, fslots, descs = [], [], []
        enc_of = dict(zip(idx, encs))
        for i, v in enumerate(template):
            if i in enc_of:
                width = 1 + 2 * len(enc_of[i][3])
                descs.append((len(final), width, per_call[i], enc_of[i], {}))
                final.extend([None] * width)
            else:
                if i in per_call:
                    fslots.append((len(final), per_call[i]))
                final.append(v)
        self.final, self.slots, self.descs = final, tuple(fslots), tuple(descs)
        return self

    def __call__(self, g: tuple, stream: int, c, kwargs: dict) -> None:
        args = self.final.copy()
        for j, n in self.slots:
            args[j] = kwargs[n]
        for j, width, n, enc, cache in self.descs:
            args[j:j + width] = _expanded(kwargs[n], enc, cache)
        self.raw(g[0], g[1], g[2], stream, c.function, self.coop, self.pdl, None, None, c.packed_metadata, None,
                 None, None, *args)


def _expanded(v, enc: tuple, cache: dict) -> list:
    """[CUtensorMap, *shape, *strides] of a descriptor argument (a tensor, whose shape and
    strides the map covers, or a ``TensorDescriptor``), as Triton 3.6's
    ``make_tensordesc_arg`` computes it, from ``cache`` when this address, shape and strides
    were encoded before."""
    if isinstance(v, torch.Tensor):
        base, shape, strides, nan = v, tuple(v.shape), v.stride(), False
    else:
        base, shape, strides, nan = v.base, tuple(v.shape), tuple(v.strides), v.padding == "nan"
    key = (base.data_ptr(), shape, strides, nan)
    hit = cache.get(key)
    if hit is not None:
        return hit
    if strides[-1] != 1:
        raise ValueError(f"a TMA descriptor needs a contiguous last dimension, got strides {strides}")
    swizzle, elem_size, dtype, block = enc
    tmap = _fill_tma()(key[0], swizzle, elem_size, dtype, block, list(shape), list(strides), 1 if nan else 0)
    out = [tmap, *shape, *strides]
    if len(cache) >= _DESC_CACHE_CAP:
        cache.clear()
    cache[key] = out
    return out


def _launch(kernel, grid: tuple[int, ...], kwargs: dict, plan: "_Plan | None" = None,
            per_call: tuple[str, ...] | None = None, descs: dict | None = None) -> None:
    """Launch ``kernel`` on ``grid`` with ``kwargs``. With a cached ``plan``, ``per_call``
    names the arguments that change between its calls (the others are the plan's own
    objects): only those are checked for trace tensors and rebound by the direct launcher.
    ``descs`` maps the TMA descriptor arguments whose kwarg holds the tensor itself to their
    block shapes: a ``TensorDescriptor`` is built for each unless the direct launcher
    expands them itself (see :class:`_Direct`)."""
    gl_ = plan is not None and plan.gluon
    if _HOOK[0] is not None:
        _HOOK[0](kernel, grid, _with_descs(kwargs, descs, gl_))
        return
    vals = kwargs.values() if per_call is None else (kwargs[n] for n in per_call)
    traced = (torch.compiler.is_compiling() or _get_dispatch_mode() is not None
              or any(_is_fake(v) for v in vals if isinstance(v, torch.Tensor)))
    if traced and is_interpreter():
        return  # tracing (fake tensors) with the CPU interpreter: nothing to run, outputs are allocated
    if traced:
        wrap_triton(kernel)[grid](**_with_descs(kwargs, descs, gl_))   # recorded in the graph (custom op)
        _COUNTS["traced"] += 1
        return
    # Eager: Triton's own launcher (wrap_triton's eager path dispatches a higher-order op per
    # launch, ~0.5 ms of host time on the H200's host, probe of 2026-11-29), and from the
    # second launch of a plan on, that launcher with the arguments bound once (_Direct).
    if plan is None or is_interpreter():
        kernel[grid](**_with_descs(kwargs, descs, gl_))
        _COUNTS["triton"] += 1
        return
    dev = torch.cuda.current_device()
    direct = plan.direct.get(dev)
    if direct is not None:
        if descs and (direct.raw is None or not (_idle(_knobs.runtime.launch_enter_hook)
                                                   and _idle(_knobs.runtime.launch_exit_hook))):
            kwargs = _with_descs(kwargs, descs, gl_)
        if direct(grid, kwargs, dev):
            _COUNTS["direct"] += 1
            return
    kwargs = _with_descs(kwargs, descs, gl_)
    compiled = kernel[grid](**kwargs)
    _COUNTS["triton"] += 1
    if direct is None and compiled is not None and _DIRECT[0] and _knobs is not None:
        plan.direct[dev] = _Direct(kernel, compiled, kwargs, per_call)


def _with_descs(kwargs: dict, descs: dict | None, gluon: bool = False) -> dict:
    """``kwargs`` with a ``TensorDescriptor`` in place of each tensor named in ``descs``
    (Gluon's, with the default shared layout of its block, for a Gluon kernel's plan)."""
    if not descs:
        return kwargs
    if gluon:
        from .hopper import gluon_descriptor as make
    else:
        from triton.tools.tensor_descriptor import TensorDescriptor

        make = TensorDescriptor.from_tensor
    out = dict(kwargs)
    for name, block in descs.items():
        v = out[name]
        if isinstance(v, torch.Tensor):
            out[name] = make(v, block)
    return out


_COUNTS = {"direct": 0, "triton": 0, "traced": 0, "gluon": 0}


def launch_counts() -> dict[str, int]:
    """How many kernel launches went through a plan's direct launcher, through Triton's own
    ``kernel[grid]`` (first launches, fallbacks, the interpreter) and through ``wrap_triton``
    (traced), since import (benchmarks record it); and, under "gluon", how many of those
    launches ran one of the sm_90 Gluon kernels (:mod:`.hopper`, :mod:`.hopper_dq`).

    Example:
        >>> sorted(launch_counts())
        ['direct', 'gluon', 'traced', 'triton']
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
    gluon: bool = False          # a Gluon kernel (hopper.py): its descriptors carry shared layouts
    direct: dict = field(default_factory=dict)   # device index -> _Direct (eager launches)
    seeded: bool = field(init=False)             # the kernel takes a per-call dropout seed
    blocks: dict | None = field(init=False)      # kwarg -> block shape of the descriptors built

    def __post_init__(self) -> None:
        self.seeded = "seed" in self.static
        blocks = {name: [1, 1, rows, cols] for name, src, rows, cols, *use in self.descs
                  if (use[0] if use else self.cfg.tma)}
        self.blocks = blocks or None


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
    per = dict(tensors)                                # what changes between calls of this plan
    if plan.seeded:
        per["seed"] = int(seed) & 0x7FFFFFFF
    for name, src, *_ in plan.descs:                   # TMA descriptors (built later), or the tensor
        per[name] = tensors[src]
    first = next(iter(tensors.values()))
    # a cached plan's direct launcher, eager: only the per-call values travel (its plan was
    # cached, so no tensor of this call is a trace's; _launch re-checks everything otherwise)
    if plan.direct and _HOOK[0] is None and _get_dispatch_mode() is None:
        dev = first.get_device()
        direct = plan.direct.get(dev)
        if direct is not None and dev == torch._C._cuda_getDevice():
            kw = per
            if plan.blocks and (direct.raw is None or not (_idle(_knobs.runtime.launch_enter_hook)
                                                            and _idle(_knobs.runtime.launch_exit_hook))):
                kw = _with_descs(per, plan.blocks, plan.gluon)
            if direct(plan.grid, kw, dev):
                _COUNTS["direct"] += 1
                if plan.name != "pre":
                    _LAST[plan.name] = plan.cfg
                return
    kw = dict(plan.static)
    kw.update(per)
    if first.is_cuda and first.device.index != torch.cuda.current_device():
        with torch.cuda.device(first.device):         # Triton launches on the current device
            _launch(plan.kernel, plan.grid, kw, plan, tuple(per), plan.blocks)
    else:
        _launch(plan.kernel, plan.grid, kw, plan, tuple(per), plan.blocks)
    if plan.name != "pre":
        _LAST[plan.name] = plan.cfg
