"""Launchers of the Triton attention kernels: the only place that checks arguments,
derives strides and scalars, picks tile configs and computes grids.

Configs: each kernel has a short candidate list per (dtype, padded head dim) in
:mod:`.configs`; the first is the default. With autotuning on (``set_autotune(True)`` or env ``MEMATTN_TRITON_AUTOTUNE=1``)
the first eager CUDA call of a new key times every candidate with ``triton.testing.do_bench``
and keeps the fastest (never while tracing). Block-map launches only consider tiles that
divide the map's blocks.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import triton
from torch.library import wrap_triton
try:
    from triton import knobs as _knobs          # the launch hooks Triton's own launcher passes on
except ImportError:  # pragma: no cover - Triton < 3.4: no direct launches (see _DIRECT)
    _knobs = None
from torch.utils._python_dispatch import _get_current_dispatch_mode as _get_dispatch_mode

from ..._checks import check_qkv_layout
from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .common import LOG2E_F
from .configs import TileConfig, _pow2, candidates
from .decode import _split_merge_kernel
from .forward import _attn_fwd_kernel
from .masks import map_blocks_for

__all__ = ["TileConfig", "MaskArgs", "forward", "backward", "set_autotune", "set_launch_hook", "override_configs",
           "candidates", "tuned_configs", "last_configs", "map_blocks_for", "is_interpreter", "launch_counts"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, eq=False)
class MaskArgs:
    """The mask tensors of :class:`~.masks.MaskSpec`, as they travel through the custom op."""

    window: torch.Tensor | None = None
    doc_id: torch.Tensor | None = None
    doc_range: torch.Tensor | None = None
    fwd: tuple[torch.Tensor | None, ...] = (None,) * 5
    bwd: tuple[torch.Tensor | None, ...] = (None,) * 5
    bits: torch.Tensor | None = None
    doc_pmin: int = 0
    map_bm: int = 0
    map_bn: int = 0
    map_heads: int = 1
    tag: str = ""

    @property
    def has_map(self) -> bool:
        return self.fwd[0] is not None


_LOCK = threading.Lock()
_HOOK: list = [None]      # set_launch_hook: replaces the launch (compile-only checks)
_TUNED: dict[tuple, TileConfig] = {}
_LAST: dict[str, TileConfig] = {}   # the config of the last launch of each kernel
_VERSION = [0]                      # bumped when the config choice may change (cached plans expire)
_OVERRIDE: dict[str, TileConfig] = {}
_AUTOTUNE = [os.environ.get("MEMATTN_TRITON_AUTOTUNE", "0") == "1"]
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
    everything that specialisation looks at except the per-call tensors, so the launcher of
    the kernel compiled by the first call can be reused as long as each tensor keeps the
    dtype and 16-byte alignment it had then (the only tensor properties Triton specialises
    on); ``__call__`` returns False otherwise and the caller takes Triton's own path.
    Integer arguments that vary per call (the dropout seed) are ``do_not_specialize``.
    """

    __slots__ = ("names", "defaults", "tensors", "compiled")

    def __init__(self, kernel, compiled, kwargs: dict) -> None:
        params = kernel.signature.parameters
        self.names = tuple(params)
        self.defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
        self.tensors = tuple((n, v.dtype, v.data_ptr() % 16 == 0) for n, v in kwargs.items()
                             if isinstance(v, torch.Tensor))
        self.compiled = compiled

    def __call__(self, grid: tuple[int, ...], kwargs: dict, device: int) -> bool:
        for n, dt, aligned in self.tensors:
            t = kwargs[n]
            if t.dtype != dt or (t.data_ptr() % 16 == 0) != aligned:
                return False
        args = [kwargs[n] if n in kwargs else self.defaults[n] for n in self.names]
        c = self.compiled
        stream = torch._C._cuda_getCurrentRawStream(device)
        g = tuple(grid) + (1,) * (3 - len(grid))
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        meta = c.launch_metadata(g, stream, *args) if enter is not None else None
        c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, meta, enter, leave, *args)
        return True


def _launch(kernel, grid: tuple[int, ...], kwargs: dict, plan: "_Plan | None" = None) -> None:
    if _HOOK[0] is not None:
        _HOOK[0](kernel, grid, kwargs)
        return
    traced = (torch.compiler.is_compiling() or _get_dispatch_mode() is not None
              or any(_is_fake(v) for v in kwargs.values() if isinstance(v, torch.Tensor)))
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
        plan.direct[dev] = _Direct(kernel, compiled, kwargs)


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


def set_autotune(enabled: bool) -> None:
    """Time the candidate configs on the first eager CUDA call of each new problem key."""
    _AUTOTUNE[0] = bool(enabled)
    _VERSION[0] += 1


def last_configs() -> dict[str, TileConfig]:
    """The tile configs of the most recent fwd / dkdv / dq launches (benchmarks record them)."""
    return dict(_LAST)


def tuned_configs() -> dict[tuple, TileConfig]:
    """The configs chosen by autotuning so far (key -> config)."""
    with _LOCK:
        return dict(_TUNED)


@contextlib.contextmanager
def override_configs(**configs: TileConfig) -> Iterator[None]:
    """Force tile configs (keys ``fwd``, ``dkdv``, ``dq``) inside the block (tests, benchmarks).

    Example:
        >>> with override_configs(fwd=TileConfig(16, 16)):
        ...     pass
    """
    for k, v in configs.items():
        if k not in ("fwd", "dkdv", "dq") or not isinstance(v, TileConfig):
            raise ValueError(f"override_configs takes fwd/dkdv/dq=TileConfig, got {k}={v!r}")
    old = dict(_OVERRIDE)
    _OVERRIDE.update(configs)
    _VERSION[0] += 1
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)
        _VERSION[0] += 1


def _is_band(m: MaskArgs) -> bool:
    """Whether the parametric path's loops are bounded by the mask (a sliding window, or
    documents), which selects the band tile defaults (configs._GPU16_BAND)."""
    return not m.has_map and (m.tag.startswith("window") or m.tag.endswith("+docs"))


def _choose(kernel: str, q: torch.Tensor, m: MaskArgs, head_dim: int, key_extra: tuple,
            bench: Callable[[TileConfig], None], tma_ok: bool) -> TileConfig:
    if kernel in _OVERRIDE:
        c = _OVERRIDE[kernel]
        if c.tma and not tma_ok:
            raise ValueError(f"{kernel} config {c} asks for TMA but these tensors' strides are not 16-byte aligned")
        return c
    mb = (m.map_bm, m.map_bn) if m.has_map else None
    cands = candidates(kernel, q.dtype, head_dim, q.device.type, mb, max(key_extra[0], key_extra[1]),
                       key_extra[0], _is_band(m))
    if not tma_ok:
        cands = [c for c in cands if not c.tma]
    if len(cands) == 1:
        return cands[0]
    key = (kernel, q.dtype, _pow2(head_dim), mb, m.doc_id is not None, m.tag, tma_ok) + key_extra
    with _LOCK:
        hit = _TUNED.get(key)
    if hit is not None:
        return hit
    if not (_AUTOTUNE[0] and q.is_cuda and not torch.compiler.is_compiling() and not _is_fake(q)):
        return cands[0]
    from triton.testing import do_bench

    times = []
    for c in cands:
        try:
            times.append(do_bench(lambda: bench(c), warmup=5, rep=25))
        except Exception:  # a config that does not fit (shared memory, registers) is skipped
            times.append(float("inf"))
    best = cands[min(range(len(cands)), key=times.__getitem__)]
    with _LOCK:
        _TUNED[key] = best
    return best


def _is_fake(t: torch.Tensor) -> bool:
    """True for a tensor without readable storage: the FakeTensor of a trace, or the
    FunctionalTensor that wraps it under Inductor's functionalisation (any tensor subclass is
    treated so: no cached plan, no data pointer read, no TMA)."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _bucket(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


# ----------------------------------------------------------------------------- checks
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: MaskArgs) -> None:
    check_qkv_layout(q, k, v)          # the layout rules every entry point shares
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"the triton backend supports float16, bfloat16 and float32; q has {q.dtype}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and (is_interpreter() or _HOOK[0] is not None)):
        raise ValueError(f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                         f"q is on {q.device}")
    B, Hq, Nq, D = q.shape
    if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
        raise ValueError(f"empty dimension: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if max(D, v.shape[3]) > 256:
        raise ValueError(f"the triton backend supports head dims up to 256, got {D} / {v.shape[3]}")
    for name, t in (("window", m.window), ("doc_id", m.doc_id), ("doc_range", m.doc_range), ("bits", m.bits),
                    *((f"map[{i}]", x) for i, x in enumerate(m.fwd + m.bwd))):
        if t is not None and t.device != q.device:
            raise ValueError(f"mask tensor {name} is on {t.device}, q on {q.device}")
    if m.has_map:
        if any(t is None for t in m.fwd + m.bwd) or m.bits is None:
            raise ValueError("a block map needs all of its lists and bit tiles")
        if m.map_bm <= 0 or m.map_bm % 32 or m.map_bn <= 0:
            raise ValueError(f"map blocks must be positive with block_q % 32 == 0, got ({m.map_bm}, {m.map_bn})")
        if m.map_heads not in (1, Hq):
            raise ValueError(f"the block map has {m.map_heads} heads but q has {Hq}")
        qb, kb = triton.cdiv(Nq, m.map_bm), triton.cdiv(k.shape[2], m.map_bn)
        if m.fwd[0].numel() != m.map_heads * qb + 1 or m.bwd[0].numel() != m.map_heads * kb + 1:
            raise ValueError("block map rows do not match the problem size")
        if m.doc_id is not None:      # band-and-globals: a window per map head and a flag per position
            if m.window is None or m.window.shape[0] not in (1, m.map_heads) or m.window.shape[-1] != 2:
                raise ValueError("a band-and-globals block map needs a (1 or map heads, 2) window")
            if m.doc_id.numel() != k.shape[2] - m.doc_pmin:
                raise ValueError(f"global flags must cover positions [{m.doc_pmin}, {k.shape[2]})")
    elif m.window is None:
        raise ValueError("a launch needs either a window (parametric path) or a block map")
    elif m.window.shape[0] not in (1, Hq) or m.window.shape[-1] != 2:
        raise ValueError(f"window must be (1 or {Hq}, 2), got {tuple(m.window.shape)}")


def _check_config(c: TileConfig, m: MaskArgs, kernel: str) -> None:
    if m.has_map and (m.map_bm % c.block_m or m.map_bn % c.block_n):
        raise ValueError(f"{kernel} tiles ({c.block_m}, {c.block_n}) must divide the map blocks "
                         f"({m.map_bm}, {m.map_bn})")


def _check_offsets(t: torch.Tensor, block: int) -> None:
    # in-tile offsets are int32: block * stride must stay below 2**31
    if max(abs(s) for s in t.stride()[2:]) * max(block, 256) >= 2**31:
        raise ValueError(f"strides {t.stride()} are too large for int32 tile offsets; pass a contiguous tensor")


# ----------------------------------------------------------------------------- helpers
_DUMMY: dict[tuple, torch.Tensor] = {}


def _dummy(device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    key = (str(device), dtype)
    t = _DUMMY.get(key)
    if t is None or _is_fake(t):
        t = torch.zeros(2, dtype=dtype, device=device)
        if not torch.compiler.is_compiling():
            _DUMMY[key] = t
    return t


def _poison() -> bool:
    return os.environ.get("MEMATTN_POISON", "0") == "1"


def _empty_like_layout(ref: torch.Tensor, last: int, dtype: torch.dtype) -> torch.Tensor:
    """A new (B, H, N, last) tensor with ``ref``'s memory layout when that is dense."""
    if last == ref.shape[3] and ref.is_contiguous() is False and _is_dense(ref):
        out = torch.empty_like(ref, dtype=dtype)
    else:
        out = torch.empty(ref.shape[:3] + (last,), dtype=dtype, device=ref.device)
    if _poison():
        out.fill_(float("nan"))
    return out


def _is_dense(t: torch.Tensor) -> bool:
    order = sorted(range(t.dim()), key=lambda i: t.stride(i))
    expect = 1
    for i in order:
        if t.stride(i) != expect:
            return False
        expect *= t.shape[i]
    return True


def _scalars(scale: float, softcap: float, dropout_p: float, seed: int) -> dict:
    if softcap > 0:
        s_in, s_out = scale / softcap, softcap * LOG2E_F
    else:
        s_in, s_out = 1.0, scale * LOG2E_F
    thr = int(math.ceil(dropout_p * (1 << 24))) if dropout_p > 0 else 0
    return dict(s_in=float(s_in), s_out=float(s_out), seed=int(seed) & 0x7FFFFFFF, drop_thr=thr,
                drop_scale=float(1.0 / (1.0 - dropout_p)))


def _mask_kwargs(m: MaskArgs, q: torch.Tensor, rows_per_head: int, lists: tuple) -> dict:
    d = _dummy(q.device)
    if m.has_map:
        bits = m.bits
        pred = m.doc_id is not None       # band-and-globals predicate instead of bit tiles
        return dict(WIN=m.window if pred else d, DOC_ID=m.doc_id if pred else d, DOC_RANGE=d, ROW_M=lists[0],
                    COL_M=lists[1], BIT_M=lists[2], ROW_F=lists[3], COL_F=lists[4], BITS=bits, ORDER=d,
                    HAS_ORDER=False, win_hs=1 if pred and m.window.shape[0] > 1 else 0,
                    doc_pmin=m.doc_pmin if pred else 0,
                    map_hs=rows_per_head if m.map_heads > 1 else 0,
                    bits_bs=bits.stride(0) if bits.shape[0] > 1 else 0)
    return dict(WIN=m.window, DOC_ID=m.doc_id if m.doc_id is not None else d,
                DOC_RANGE=m.doc_range if m.doc_range is not None else d,
                ROW_M=d, COL_M=d, BIT_M=d, ROW_F=d, COL_F=d, BITS=d, ORDER=d, HAS_ORDER=False,
                win_hs=1 if m.window.shape[0] > 1 else 0, doc_pmin=m.doc_pmin, map_hs=0, bits_bs=0)


# A block-map row this many times longer than the mean (the rows of global tokens) makes the
# kernels run their programs longest first (tests set 0: always reorder).
_ORDER_SKEW = [4.0]


def _program_order(lists: tuple, rows: torch.Tensor) -> torch.Tensor | None:
    """Longest-first program order of a block-map launch, or None when the rows are even.

    ``lists`` are a direction's CSR tile lists (masked row pointers first, full ones fourth);
    ``rows`` (P,) or (P, G) the map rows each program walks (G heads of a GQA group). A
    program's cost is its tiles, a masked tile counted 1.5 full ones. The sort is stable, so
    programs of equal cost keep the grid's order (adjacent programs share K/V in L2)."""
    if _is_fake(lists[0]) or torch.compiler.is_compiling():
        return None
    pm, pf = lists[0].long(), lists[3].long()
    cost = 3 * (pm[1:] - pm[:-1]) + 2 * (pf[1:] - pf[:-1])
    w = cost[rows]
    if w.dim() == 2:
        w = w.sum(1)
    if w.numel() == 0 or float(w.max()) <= _ORDER_SKEW[0] * float(w.float().mean()):
        return None
    return torch.argsort(-w, stable=True).to(torch.int32)


def _order_kwargs(lists: tuple, rows: Callable[[], torch.Tensor]) -> dict:
    """ORDER / HAS_ORDER of a block-map launch (nothing while tracing: the lists are fake)."""
    if _is_fake(lists[0]) or torch.compiler.is_compiling():
        return {}
    order = _program_order(lists, rows())
    return {} if order is None else dict(ORDER=order, HAS_ORDER=True)


def _row_programs(B: int, H: int, n_blocks: int, block: int, map_block: int, map_hs: int, reverse: bool,
                  group: int, device: torch.device) -> torch.Tensor:
    """The map row of each program of a 1-D grid over (batch, head, block): (P,) or, with a
    GQA group > 1, (P, group). ``reverse``: block index counted from the end (forward, dQ)."""
    p = torch.arange(B * H * n_blocks, device=device)
    bh, j = p // n_blocks, p % n_blocks
    if reverse:
        j = n_blocks - 1 - j
    h = (bh % H)[:, None] * group + torch.arange(group, device=device)[None, :]
    rows = h * map_hs + (j * block // map_block)[:, None]
    return rows[:, 0] if group == 1 else rows


def _needs_i64(*ts: torch.Tensor) -> bool:
    """Whether a row offset (row * stride_n + d * stride_d, inside one (batch, head)) may
    reach 2**31 elements; then the kernels do that arithmetic in int64."""
    return any((t.shape[2] + 256) * abs(t.stride(2)) + t.shape[3] * abs(t.stride(3)) >= 2**31 for t in ts)


def _flags(q: torch.Tensor, m: MaskArgs, D: int, Dv: int, softcap: float, dropout_p: float,
           *ts: torch.Tensor) -> dict:
    bd, bdv = _pow2(D), _pow2(Dv)
    return dict(BLOCK_D=bd, BLOCK_DV=bdv, EVEN_D=(bd == D and bdv == Dv),
                MAP_BM=m.map_bm if m.has_map else 32, MAP_BN=m.map_bn if m.has_map else 32,
                HAS_MAP=m.has_map, HAS_DOCS=m.doc_id is not None,   # with HAS_MAP: band-and-globals
                HAS_SOFTCAP=softcap > 0, HAS_DROPOUT=dropout_p > 0,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", I64=_needs_i64(*ts))


def _tma_ok(*ts: torch.Tensor) -> bool:
    """TMA descriptors need a unit last stride, 16-byte aligned other strides and base."""
    for t in ts:
        if _is_fake(t):      # traced: the data pointer is unknown, so no descriptor
            return False
        es = t.element_size()
        if t.stride(3) != 1 and t.shape[3] != 1:
            return False
        if any(s <= 0 for s, n in zip(t.stride(), t.shape) if n > 1):
            return False
        if any((s * es) % 16 for s in t.stride()[:3]) or t.data_ptr() % 16:
            return False
    return True


def _desc(t: torch.Tensor, rows: int, cols: int, use: bool):
    """A (B, H, N, D) TMA descriptor with [1, 1, rows, cols] blocks, or the tensor itself."""
    if not use:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [1, 1, rows, cols])


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return tuple(reversed(st))  # type: ignore[return-value]


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(int(s) for s in t.stride())  # type: ignore[return-value]


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
    descs: tuple = ()            # (kwarg, tensor kwarg, rows, cols) of the TMA descriptors
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
    if "seed" in kw:
        kw["seed"] = int(seed) & 0x7FFFFFFF
    for name, src, rows, cols in plan.descs:           # TMA descriptors, or the tensor itself
        kw[name] = _desc(tensors[src], rows, cols, plan.cfg.tma)
    first = next(iter(tensors.values()))
    if first.is_cuda and first.device.index != torch.cuda.current_device():
        with torch.cuda.device(first.device):         # Triton launches on the current device
            _launch(plan.kernel, plan.grid, kw, plan)
    else:
        _launch(plan.kernel, plan.grid, kw, plan)
    if plan.name != "pre":
        _LAST[plan.name] = plan.cfg


def _tracing(*ts: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or any(_is_fake(t) for t in ts)


def _fwd_plan(q, k, v, m: MaskArgs, scale: float, softcap: float, dropout_p: float) -> tuple[_Plan, bool]:
    _check(q, k, v, m)
    if not (scale > 0) or softcap < 0 or not (0 <= dropout_p < 1):
        raise ValueError(f"bad scalars: scale={scale}, softcap={softcap}, dropout_p={dropout_p}")
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    like = Dv == D and not q.is_contiguous() and _is_dense(q)
    o_strides = _strides(q) if like else _contiguous_strides((B, Hq, Nq, Dv))
    rows = triton.cdiv(Nq, m.map_bm) if m.has_map else 0
    static = dict(_mask_kwargs(m, q, rows, m.fwd))
    for pre, st_ in (("sq", _strides(q)), ("sk", _strides(k)), ("sv", _strides(v)), ("so", o_strides)):
        static.update(zip((pre + "b", pre + "h", pre + "n", pre + "d"), st_))
    static.update(BH=B * Hq, Hq=Hq, GROUP=Hq // Hkv, Nq=Nq, Nk=Nk, HEAD_D=D, HEAD_DV=Dv,
                  **_scalars(scale, softcap, dropout_p, 0))
    flags = _flags(q, m, D, Dv, softcap, dropout_p, q, k, v)

    def plan_of(c: TileConfig) -> _Plan:
        _check_config(c, m, "fwd")
        for t in (q, k, v):
            _check_offsets(t, max(c.block_m, c.block_n))
        progs = triton.cdiv(Nq, c.block_m) * B * Hq
        n_split = 1 if m.has_map else kv_splits(progs, triton.cdiv(Nk, c.block_n), q.device)
        st = dict(static, **flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, num_warps=c.num_warps,
                  num_stages=c.num_stages, n_split=n_split, SPLIT=n_split > 1,
                  so_split=B * Hq * Nq * Dv if n_split > 1 else 0, sl_split=B * Hq * Nq if n_split > 1 else 0)
        if m.has_map:
            st.update(_order_kwargs(m.fwd, lambda: _row_programs(
                B, Hq, triton.cdiv(Nq, c.block_m), c.block_m, m.map_bm, static["map_hs"], True, 1, q.device)))
        if n_split > 1:       # the partials are contiguous float32 (split, B, Hq, Nq, Dv)
            st.update(zip(("sob", "soh", "son", "sod"), _contiguous_strides((B, Hq, Nq, Dv))))
        descs = (("KD", "K", c.block_n, flags["BLOCK_D"]), ("VD", "V", c.block_n, flags["BLOCK_DV"]))
        return _Plan(_attn_fwd_kernel, (progs * n_split,), st, c, "fwd", descs, n_split)

    def bench(c: TileConfig) -> None:       # autotuning only: scratch outputs
        plan = plan_of(c)
        out_b, lse_b = _fwd_outputs(q, B, Hq, Nq, Dv, like, plan.split)
        _run_plan(plan, dict(Q=q, K=k, V=v, Out=out_b, Lse=lse_b), 0)

    cfg = _choose("fwd", q, m, max(D, Dv), (_bucket(Nq), _bucket(Nk), softcap > 0, dropout_p > 0), bench,
                  _tma_ok(k, v))
    return plan_of(cfg), like


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: MaskArgs, *, scale: float, softcap: float = 0.0,
            dropout_p: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); any strides.
        m: the mask tensors; scale, softcap, dropout_p, seed: as memattn.attention.
    Returns:
        out (B, Hq, Nq, Dv) in q's dtype (q's memory layout when dense), lse float32 (B, Hq, Nq).
    """
    poison = _poison()
    key = None if _tracing(q, k, v) else ("fwd", _meta(q), _meta(k), _meta(v), m, float(scale), float(softcap),
                                           float(dropout_p), _VERSION[0], poison)
    plan, like = _cached(key, lambda: _fwd_plan(q, k, v, m, scale, softcap, dropout_p))
    B, Hq, Nq = q.shape[:3]
    out, lse = _fwd_outputs(q, B, Hq, Nq, v.shape[3], like, plan.split)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    _run_plan(plan, dict(Q=q, K=k, V=v, Out=out, Lse=lse), seed)
    if plan.split > 1:
        out, lse = _merge_splits(out, lse, q, like)
    return out, lse


def _fwd_outputs(q: torch.Tensor, B: int, Hq: int, Nq: int, Dv: int, like: bool, split: int):
    """(out, lse) buffers of a forward launch: the output and float32 lse, or with split-KV the
    float32 partials (split, B, Hq, Nq, Dv) and (split, B, Hq, Nq)."""
    if split > 1:
        return (torch.empty((split, B, Hq, Nq, Dv), dtype=torch.float32, device=q.device),
                torch.empty((split, B, Hq, Nq), dtype=torch.float32, device=q.device))
    out = torch.empty_like(q) if like else torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    return out, torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)


def _merge_splits(o_p: torch.Tensor, lse_p: torch.Tensor, q: torch.Tensor, like: bool):
    """The exact softmax merge of split-KV partials, one kernel launch: lse = logsumexp_s
    lse_s, out = Σ_s exp(lse_s − lse) · o_s (rows without any key keep out 0, lse −inf)."""
    split, B, Hq, Nq, Dv = o_p.shape
    out = torch.empty_like(q) if like else torch.empty((B, Hq, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    rows = B * Hq * Nq
    block_r = 16
    kw = dict(OP=o_p, LP=lse_p, Out=out, Lse=lse, n_split=split, R=rows, Hq=Hq, Nq=Nq, HEAD_DV=Dv,
              BLOCK_R=block_r, BLOCK_DV=_pow2(Dv), num_warps=4)
    kw.update(zip(("sob", "soh", "son", "sod"), _strides(out)))
    grid = (triton.cdiv(rows, block_r),)
    key = ("merge", grid, tuple(out.stride()), out.dtype, out.device, split, Dv)
    plan = _MERGE_PLANS.get(key)
    if plan is None and not _tracing(q):
        if len(_MERGE_PLANS) > _PLAN_CAP:
            _MERGE_PLANS.clear()
        plan = _MERGE_PLANS.setdefault(key, _Plan(_split_merge_kernel, grid, {}, TileConfig(block_r, 0), "merge"))
    _launch(_split_merge_kernel, grid, kw, plan)
    return out, lse


_MERGE_PLANS: dict[tuple, "_Plan"] = {}


_SPLIT_OVERRIDE: list[int | None] = [None]


@contextlib.contextmanager
def force_kv_splits(n: int | None) -> Iterator[None]:
    """Force the forward's split-KV count on the parametric path (tests; None: the heuristic).

    Example:
        >>> with force_kv_splits(3):
        ...     pass
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"force_kv_splits takes a positive int or None, got {n!r}")
    old = _SPLIT_OVERRIDE[0]
    _SPLIT_OVERRIDE[0] = n
    _VERSION[0] += 1
    try:
        yield
    finally:
        _SPLIT_OVERRIDE[0] = old
        _VERSION[0] += 1


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def kv_splits(programs: int, key_blocks: int, device: torch.device) -> int:
    """Split-KV programs per (head, query block) for a forward of ``programs`` programs over
    ``key_blocks`` key blocks: 1 when the grid fills the GPU; otherwise enough splits for about
    two programs per multiprocessor, each with at least 4 key blocks (at most 16 splits).
    Decoding (one query block per head) is the case this serves."""
    if _SPLIT_OVERRIDE[0] is not None:
        return max(1, min(_SPLIT_OVERRIDE[0], key_blocks))
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // programs), key_blocks // 4, 16))


def _bwd_plan(q, k, v, out, dout, m: MaskArgs, scale: float, softcap: float, dropout_p: float):
    _check(q, k, v, m)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    for name, t in (("out", out), ("dout", dout)):
        if tuple(t.shape) != (B, Hq, Nq, Dv) or t.device != q.device:
            raise ValueError(f"{name} must be ({B}, {Hq}, {Nq}, {Dv}) on {q.device}, got {tuple(t.shape)}")
    bdv = _pow2(Dv)
    pre_bm = 64 if bdv <= 128 else 32
    pre = dict(Hq=Hq, Nq=Nq, HEAD_DV=Dv, BLOCK_M=pre_bm, BLOCK_DV=bdv, num_warps=4)
    pre.update(zip(("sob", "soh", "son", "sod", "sdb", "sdh", "sdn", "sdd"), _strides(out) + _strides(dout)))
    pre_plan = _Plan(_attn_bwd_preprocess_kernel, (B * Hq * triton.cdiv(Nq, pre_bm),), pre, TileConfig(pre_bm, 0),
                     "pre")
    like = tuple(not t.is_contiguous() and _is_dense(t) for t in (q, k, v))
    g_strides = [_strides(t) if lk else _contiguous_strides(tuple(t.shape)) for t, lk in zip((q, k, v), like)]
    sc = _scalars(scale, softcap, dropout_p, 0)
    flags = _flags(q, m, D, Dv, softcap, dropout_p, q, k, v, dout)
    common = dict(Hq=Hq, GROUP=Hq // Hkv, Nq=Nq, Nk=Nk, HEAD_D=D, HEAD_DV=Dv, scale=float(scale), **sc)
    for pre_, t in (("sq", q), ("sk", k), ("sv", v), ("sdo", dout)):
        common.update(zip((pre_ + "b", pre_ + "h", pre_ + "n", pre_ + "d"), _strides(t)))
    key_extra = (_bucket(Nq), _bucket(Nk), softcap > 0, dropout_p > 0)
    kv_static = dict(common, BHK=B * Hkv, Hkv=Hkv,
                     **_mask_kwargs(m, q, triton.cdiv(Nk, m.map_bn) if m.has_map else 0, m.bwd))
    for pre_, st_ in (("sdk", g_strides[1]), ("sdv", g_strides[2])):
        kv_static.update(zip((pre_ + "b", pre_ + "h", pre_ + "n", pre_ + "d"), st_))
    q_static = dict(common, BH=B * Hq, **_mask_kwargs(m, q, triton.cdiv(Nq, m.map_bm) if m.has_map else 0, m.fwd))
    q_static.update(zip(("sdqb", "sdqh", "sdqn", "sdqd"), g_strides[0]))

    def kv_plan(c: TileConfig) -> _Plan:
        _check_config(c, m, "dkdv")
        for t in (q, k, v, dout):
            _check_offsets(t, max(c.block_m, c.block_n))
        st = dict(kv_static, **flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, num_warps=c.num_warps,
                  num_stages=c.num_stages)
        if m.has_map:
            st.update(_order_kwargs(m.bwd, lambda: _row_programs(
                B, Hkv, triton.cdiv(Nk, c.block_n), c.block_n, m.map_bn, kv_static["map_hs"], False, Hq // Hkv,
                q.device)))
        descs = (("QD", "Q", c.block_m, flags["BLOCK_D"]), ("DOD", "DO", c.block_m, flags["BLOCK_DV"]))
        return _Plan(_attn_bwd_dkdv_kernel, (triton.cdiv(Nk, c.block_n) * B * Hkv,), st, c, "dkdv", descs)

    def q_plan(c: TileConfig) -> _Plan:
        _check_config(c, m, "dq")
        for t in (q, k, v, dout):
            _check_offsets(t, max(c.block_m, c.block_n))
        st = dict(q_static, **flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, num_warps=c.num_warps,
                  num_stages=c.num_stages)
        if m.has_map:
            st.update(_order_kwargs(m.fwd, lambda: _row_programs(
                B, Hq, triton.cdiv(Nq, c.block_m), c.block_m, m.map_bm, q_static["map_hs"], True, 1, q.device)))
        descs = (("KD", "K", c.block_n, flags["BLOCK_D"]), ("VD", "V", c.block_n, flags["BLOCK_DV"]))
        return _Plan(_attn_bwd_dq_kernel, (triton.cdiv(Nq, c.block_m) * B * Hq,), st, c, "dq", descs)

    def scratch(i: int) -> torch.Tensor:     # autotuning only
        t = (q, k, v)[i]
        return torch.empty_like(t) if like[i] else torch.empty(t.shape, dtype=t.dtype, device=t.device)

    def bench_kv(c: TileConfig) -> None:
        z = torch.zeros((B, Hq, Nq), dtype=torch.float32, device=q.device)
        _run_plan(kv_plan(c), dict(Q=q, K=k, V=v, DO=dout, Lse2=z, Delta=z, DK=scratch(1), DV=scratch(2)), 0)

    def bench_q(c: TileConfig) -> None:
        z = torch.zeros((B, Hq, Nq), dtype=torch.float32, device=q.device)
        _run_plan(q_plan(c), dict(Q=q, K=k, V=v, DO=dout, Lse2=z, Delta=z, DQ=scratch(0)), 0)

    c_kv = _choose("dkdv", q, m, max(D, Dv), key_extra, bench_kv, _tma_ok(q, dout))
    c_q = _choose("dq", q, m, max(D, Dv), key_extra, bench_q, _tma_ok(k, v))
    return pre_plan, kv_plan(c_kv), q_plan(c_q), like


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
             lse: torch.Tensor, m: MaskArgs, *, scale: float, softcap: float = 0.0, dropout_p: float = 0.0,
             seed: int = 0, dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: preprocess (delta, lse2), then the dK/dV and dQ kernels.

    Args:
        q, k, v, m, scale, softcap, dropout_p, seed: as :func:`forward`.
        out, dout: (B, Hq, Nq, Dv), the output and its gradient (any strides).
        lse: float32 (B, Hq, Nq), natural log; dlse: optional gradient of lse.
    Returns:
        dq, dk, dv with the shapes (and dense layouts) of q, k, v.
    """
    B, Hq, Nq = q.shape[:3]
    if tuple(lse.shape) != (B, Hq, Nq):
        raise ValueError(f"lse must be ({B}, {Hq}, {Nq}), got {tuple(lse.shape)}")
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    poison = _poison()
    key = None if _tracing(q, k, v, out, dout) else ("bwd", _meta(q), _meta(k), _meta(v), _meta(out), _meta(dout),
                                                     m, float(scale), float(softcap), float(dropout_p), _VERSION[0],
                                                     poison)
    pre_plan, kv_p, q_p, like = _cached(key, lambda: _bwd_plan(q, k, v, out, dout, m, scale, softcap, dropout_p))
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    _run_plan(pre_plan, dict(O=out, DO=dout, Lse=lse, Delta=delta, Lse2=lse2), 0)
    if dlse is not None:
        delta = delta - dlse.to(torch.float32)
    dq, dk, dv = (torch.empty_like(t) if lk else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                  for t, lk in zip((q, k, v), like))
    if poison:
        for t in (dq, dk, dv):
            t.fill_(float("nan"))
    base = dict(Q=q, K=k, V=v, DO=dout, Lse2=lse2, Delta=delta)
    _run_plan(kv_p, dict(base, DK=dk, DV=dv), seed)
    _run_plan(q_p, dict(base, DQ=dq), seed)
    return dq, dk, dv
