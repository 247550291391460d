"""The arguments of the Triton kernels' launches: the mask tensors as they travel
(:class:`MaskArgs`), the checks of inputs, tiles and offsets, and the pure helpers that turn
tensors and options into kernel arguments (strides, scalars, constexpr flags, mask tensors,
block-map program order, edge loops). No state a test or a knob changes lives here; the
launchers (:mod:`.launch`) combine these into cached plans.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from ..._checks import check_qkv_layout
from .common import LOG2E_F
from .configs import TileConfig, _pow2
from .plans import _HOOK, _is_fake, is_interpreter

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
    if kernel == "dkdv" and c.block_m > 128:      # the backward's lse2 / delta rows are padded for 128
        raise ValueError(f"dkdv query tiles have at most 128 rows, got block_m={c.block_m}")
    if m.has_map and (m.map_bm % c.block_m or m.map_bn % c.block_n):
        raise ValueError(f"{kernel} tiles ({c.block_m}, {c.block_n}) must divide the map blocks "
                         f"({m.map_bm}, {m.map_bn})")


def _check_offsets(t: torch.Tensor, block: int) -> None:
    # in-tile offsets are int32: block * stride must stay below 2**31
    if max(abs(s) for s in t.stride()[2:]) * max(block, 256) >= 2**31:
        raise ValueError(f"strides {t.stride()} are too large for int32 tile offsets; pass a contiguous tensor")


# ----------------------------------------------------------------------------- helpers
_DUMMY: dict[tuple, torch.Tensor] = {}


def _dummy(like: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A 2-element zero tensor on ``like``'s device for pointer arguments a kernel does not read.

    Eager calls share one per (device, dtype). Under a trace (``like`` a fake / functional
    tensor, or dynamo compiling) a fresh one is made in the trace's mode: a cached real tensor
    reaching a fake-tensor trace (Inductor's backward graph) fails its compile."""
    key = (str(like.device), dtype)
    if _tracing(like):
        return torch.zeros(2, dtype=dtype, device=like.device)
    t = _DUMMY.get(key)
    if t is None or _is_fake(t):
        t = _DUMMY[key] = torch.zeros(2, dtype=dtype, device=like.device)
    return t


def _poison() -> bool:
    return os.environ.get("MEMATTN_POISON", "0") == "1"


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
    d = _dummy(q)
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


def _edge_loops(m: MaskArgs, kernel: str, nq: int, nk: int, bm: int, bn: int) -> dict:
    """Which edge loops of the parametric path a kernel keeps (constexprs LEAD, TRAIL): the
    tiles before its unmasked ones and after them. Known empty from the mask's tag, they are
    compiled out, pipeline prologue included (a cost short sequences felt). A query block's
    key tiles (forward, dQ): a full mask has no edge but a partial last key block, a causal one
    only the trailing diagonal. A key block's query tiles (dK/dV): the diagonal leads, and a
    partial last query block trails. Other tags (windows, documents, unknown) keep both."""
    tag = "" if m.has_map else m.tag
    if kernel == "dkdv":
        return dict(LEAD=tag != "full", TRAIL=tag not in ("full", "causal") or nq % bm != 0)
    return dict(LEAD=tag not in ("full", "causal"), TRAIL=tag != "full" or nk % bn != 0)


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


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return tuple(reversed(st))  # type: ignore[return-value]


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(int(s) for s in t.stride())  # type: ignore[return-value]


def _tracing(*ts: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or any(_is_fake(t) for t in ts)
