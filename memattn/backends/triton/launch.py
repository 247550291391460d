"""Launchers of the Triton attention kernels: the only place that checks arguments (with
the checks and argument helpers of :mod:`.args`), picks tile configs and computes grids
(the plans it builds are cached and launched by :mod:`.plans`).

Configs: each kernel has a short candidate list per (dtype, padded head dim) in
:mod:`.configs`; the first is the default. With autotuning on (``set_autotune(True)`` or env ``MEMATTN_TRITON_AUTOTUNE=1``)
the first eager CUDA call of a new key times every candidate with ``triton.testing.do_bench``
and keeps the fastest (never while tracing). Block-map launches only consider tiles that
divide the map's blocks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton

from ..._checks import check_accumulate_into
from .args import (_ORDER_SKEW, MaskArgs, _bucket, _check, _check_config, _check_offsets,  # noqa: F401
                   _contiguous_strides, _dummy, _edge_loops, _flags, _is_dense, _mask_kwargs, _order_kwargs, _poison,
                   _program_order, _row_programs, _scalars, _strides, _tma_ok, _tracing)
from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_ds_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .configs import _SHORT_N, TileConfig, _pow2, candidates
from .decode import _split_merge_kernel
from . import hopper, hopper_dq
from .forward import _attn_fwd_kernel
from .masks import map_blocks_for
from .plans import (_COUNTS, _DIRECT, _HOOK, _LAST, _PLAN_CAP, _PLANS, _Direct, _Plan, _cached, _desc,  # noqa: F401
                    _is_fake, _launch, _meta, _run_plan, is_interpreter, launch_counts, set_launch_hook)

__all__ = ["TileConfig", "MaskArgs", "forward", "backward", "set_autotune", "set_backward", "using_backward",
           "set_launch_hook", "override_configs", "candidates", "tuned_configs", "last_configs", "map_blocks_for",
           "is_interpreter", "launch_counts"]

_LOCK = threading.Lock()
_TUNED: dict[tuple, TileConfig] = {}
_VERSION = [0]                      # bumped when the config choice may change (cached plans expire)
# Grid order of the forward and dQ launches for a plain causal mask: heads in groups of this
# many, each group's query blocks last first across its heads (common._grid_pos), so the
# longest rows of 16 heads start together and short ones end the grid. H200 (session 8):
# causal 1k / 4k forward -3%, dQ -3 to -4% against one head after another; full masks
# unchanged. Other masks keep 1 (block maps: their longest-first ORDER assumes it; windows
# and documents were not measured). MEMATTN_TRITON_HGROUP=1 restores the old order.
# MEMATTN_TRITON_HGROUP_TAGS (comma-separated mask tags, default "causal") names the
# parametric masks that take the grouped order, e.g. "causal,causal+docs,window" (A/B runs).
_HGROUP = [int(os.environ.get("MEMATTN_TRITON_HGROUP", "16"))]
_HGROUP_TAGS = [frozenset(os.environ.get("MEMATTN_TRITON_HGROUP_TAGS", "causal").split(","))]


def _hgroup(m: "MaskArgs") -> int:
    return max(1, _HGROUP[0]) if not m.has_map and m.tag in _HGROUP_TAGS[0] else 1


# The same grouping for the two-pass dK/dV launch of a plain causal mask (kv heads in groups
# of 16, first key blocks first). H200 (session 10, per-kernel A/B, order 1 16 16 1): causal
# 4k dK/dV 1023 / 1025 -> 973 / 973 us (-5%, fwd+bwd -2%), causal 1k 335 / 334 -> 337 / 338
# us (+1%). So 16 only where dK/dV takes its long-sequence tiles (max(Nq, Nk) >
# configs._SHORT_N, 2048), 1 below. MEMATTN_TRITON_HGROUP_DKDV=n forces n at every length.
_HGROUP_KV_ENV = os.environ.get("MEMATTN_TRITON_HGROUP_DKDV")
_HGROUP_KV: list[int | None] = [int(_HGROUP_KV_ENV) if _HGROUP_KV_ENV else None]
_HGROUP_KV_AUTO = 16


def _hgroup_kv(m: "MaskArgs", atomic: bool, seq_len: int) -> int:
    # atomic chunks keep 1: their launches cover a subset of the kv heads
    if atomic or m.has_map or m.tag not in _HGROUP_TAGS[0]:
        return 1
    if _HGROUP_KV[0] is not None:
        return max(1, _HGROUP_KV[0])
    return _HGROUP_KV_AUTO if seq_len > _SHORT_N["dkdv"] else 1


_OVERRIDE: dict[str, TileConfig] = {}
_AUTOTUNE = [os.environ.get("MEMATTN_TRITON_AUTOTUNE", "0") == "1"]
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
    """Force tile configs (keys ``fwd``, ``dkdv``, ``dq``; ``dkdva``: the dK/dV pass with
    atomic dQ) inside the block (tests, benchmarks).

    Example:
        >>> with override_configs(fwd=TileConfig(16, 16)):
        ...     pass
    """
    for k, v in configs.items():
        if k not in ("fwd", "dkdv", "dkdva", "dq") or not isinstance(v, TileConfig):
            raise ValueError(f"override_configs takes fwd/dkdv/dkdva/dq=TileConfig, got {k}={v!r}")
    old = dict(_OVERRIDE)
    _OVERRIDE.update(configs)
    _VERSION[0] += 1
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)
        _VERSION[0] += 1


# Documents whose mean length is at least this many tokens take the dense tile defaults:
# their loops are as long as a dense causal mask's of that length. H200, 16 causal documents
# of 4096 tokens at 64k, D = 128 (the band defaults are (64, 64, 4, 3) / (32, 64, 4, 3)):
# dense forward (128, 64, 8, 3) 6.1% faster and dense dK/dV (64, 128, 8, 3) 4.8% faster in
# session 6's sweep (h200_tune_session6_band.json), 3.4% / 1.0% under sustained load in
# session 10's (h200_tune_session10_sustain.json); session 4's sweep, on older kernels, had
# the band tiles 2.7% ahead on both. Session 12, same call, record-style rows alternating
# band / dense / band / dense (h200_session12.json): forward+backward 9.80 / 9.66 / 9.78 / 9.57
# ms (dense -1.8%, dK/dV -4% per kernel), forward 2.45 / 2.48 / 2.50 / 2.43 ms (a wash).
# Documents of 1024 tokens (16k) keep the band tiles (6–11% faster there in all three sweeps).
# Lengths in between were not measured.
# MEMATTN_TRITON_LONG_DOC=n moves the threshold (0: documents always take the dense tiles).
_LONG_DOC = [int(os.environ.get("MEMATTN_TRITON_LONG_DOC", "4096"))]


def _is_band(m: MaskArgs) -> bool:
    """Whether the parametric path's loops are bounded by the mask (a sliding window, or
    documents shorter on average than ``_LONG_DOC`` tokens), which selects the band tile
    defaults (configs._GPU16_BAND)."""
    if m.has_map:
        return False
    if m.tag.startswith("window"):
        return True
    if m.tag.endswith("+docs"):
        n_docs = max(1, m.doc_range.shape[0] - 1) if m.doc_range is not None else 1
        positions = m.doc_id.shape[0] if m.doc_id is not None else 0
        return positions < _LONG_DOC[0] * n_docs
    return False


def _choose(kernel: str, q: torch.Tensor, m: MaskArgs, head_dim: int, key_extra: tuple,
            bench: Callable[[TileConfig], None], tma_ok: bool) -> TileConfig:
    if kernel == "dkdva" and kernel not in _OVERRIDE:
        kernel_o = "dkdv"                  # the atomic-dQ pass follows a dK/dV override
    else:
        kernel_o = kernel
    if kernel_o in _OVERRIDE:
        c = _OVERRIDE[kernel_o]
        if c.tma and not tma_ok:
            raise ValueError(f"{kernel} config {c} asks for TMA but these tensors' strides are not 16-byte aligned")
        return c
    mb = (m.map_bm, m.map_bn) if m.has_map else None
    cands = candidates(kernel, q.dtype, head_dim, q.device.type, mb, max(key_extra[0], key_extra[1]),
                       key_extra[0], _is_band(m), not m.has_map and m.tag == "causal")
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
                  num_stages=c.num_stages, n_split=n_split, SPLIT=n_split > 1, hgroup=_hgroup(m),
                  **_edge_loops(m, "fwd", Nq, Nk, c.block_m, c.block_n),
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
    if _gluon_wanted(q, k, v, m, softcap, dropout_p):
        return _gluon_forward(q, k, v, m, scale, poison)
    key = None if _tracing(q, k, v) else ("fwd", _meta(q), _meta(k), _meta(v), m, float(scale), float(softcap),
                                           float(dropout_p), _VERSION[0], poison, _HGROUP[0], _HGROUP_TAGS[0])
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


def _gluon_wanted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: MaskArgs, softcap: float,
                  dropout_p: float) -> bool:
    """Whether the Gluon Hopper forward (:mod:`.hopper`) takes this call: eager CUDA calls it
    covers (see ``hopper.usable``), no launch hook installed, and no Triton forward config
    forced by ``override_configs`` (a forced config means "run the Triton kernel", except
    :data:`hopper.CONFIG`'s marker, which forces the Gluon path where it applies)."""
    if not (q.is_cuda and hopper.HAVE_GLUON):
        return False
    forced = _OVERRIDE.get("fwd")
    if forced is not None and forced.num_warps != hopper.GLUON_WARPS:
        return False
    if _HOOK[0] is not None or _tracing(q, k, v):
        return False
    return hopper.usable(q, k, v, m.has_map, softcap, dropout_p, _tma_ok(q, k, v))


def _gluon_pass_wanted(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: tuple, m: MaskArgs,
                       softcap: float, dropout_p: float) -> bool:
    """Whether a Gluon backward pass takes a two-pass backward's ``name`` pass ("dkdv":
    :func:`hopper.dkdv_plan`; "dq": :func:`hopper_dq.dq_plan`, unless MEMATTN_GLUON_DQ=0):
    eager CUDA calls that ``hopper.usable_dkdv`` / ``hopper.usable`` accept, every tensor in
    ``tensors`` (dO, O for dQ, the gradients when accumulating) TMA-compatible, no launch hook,
    and no Triton config forced for that pass."""
    if not (q.is_cuda and hopper.HAVE_GLUON):
        return False
    forced = _OVERRIDE.get(name)
    if forced is not None and forced.num_warps != hopper.GLUON_WARPS:
        return False
    if _HOOK[0] is not None or _tracing(q, k, v, *tensors):
        return False
    tma_ok = _tma_ok(q, k, v, *tensors)
    if name == "dkdv":
        return hopper.usable_dkdv(q, k, v, m.window, m.has_map, softcap, dropout_p, tma_ok)
    return hopper_dq.enabled() and hopper.usable(q, k, v, m.has_map, softcap, dropout_p, tma_ok)


def _gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: MaskArgs, scale: float,
                   poison: bool) -> tuple[torch.Tensor, torch.Tensor]:
    def build() -> _Plan:
        _check(q, k, v, m)
        if not (scale > 0):
            raise ValueError(f"bad scalars: scale={scale}")
        return hopper.forward_plan(q, k, m.window, m.doc_id, m.doc_range, m.doc_pmin, scale, m.tag == "causal")

    plan = _cached(("gfwd", _meta(q), _meta(k), _meta(v), m, float(scale), _VERSION[0]), build)
    B, Hq, Nq, D = q.shape
    like = not q.is_contiguous() and _is_dense(q)
    out, lse = _fwd_outputs(q, B, Hq, Nq, D, like, 1)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    hopper.run_forward(plan, q, k, v, out, lse)
    _COUNTS["gluon"] += 1
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
              BLOCK_R=block_r, BLOCK_DV=_pow2(Dv), EVEN_D=_pow2(Dv) == Dv, num_warps=4)
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


def _bwd_plan(q, k, v, out, dout, m: MaskArgs, scale: float, softcap: float, dropout_p: float, atomic: bool,
              fuse: bool, stored: bool = False, grads: tuple | None = None) -> "_BwdPlans":
    _check(q, k, v, m)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    for name, t in (("out", out), ("dout", dout)):
        if tuple(t.shape) != (B, Hq, Nq, Dv) or t.device != q.device:
            raise ValueError(f"{name} must be ({B}, {Hq}, {Nq}, {Dv}) on {q.device}, got {tuple(t.shape)}")
    bdv = _pow2(Dv)
    pre_bm = 64 if bdv <= 128 else 32
    lse_rs = _lse_rs(Nq, m)
    pre = dict(Hq=Hq, Nq=Nq, HEAD_DV=Dv, lse_rs=lse_rs, BLOCK_M=pre_bm, BLOCK_DV=bdv, EVEN_D=bdv == Dv, num_warps=4)
    pre.update(zip(("sob", "soh", "son", "sod", "sdb", "sdh", "sdn", "sdd"), _strides(out) + _strides(dout)))
    pre_plan = _Plan(_attn_bwd_preprocess_kernel, (B * Hq * (lse_rs // pre_bm),), pre, TileConfig(pre_bm, 0),
                     "pre")
    like = tuple(not t.is_contiguous() and _is_dense(t) for t in (q, k, v))
    g_strides = [_strides(t) if lk else _contiguous_strides(tuple(t.shape)) for t, lk in zip((q, k, v), like)]
    if grads is not None:         # accumulate into the caller's tensors: their strides
        g_strides = [_strides(g) for g in grads]
    sc = _scalars(scale, softcap, dropout_p, 0)
    flags = _flags(q, m, D, Dv, softcap, dropout_p, q, k, v, dout, *(grads or ()))
    common = dict(Hq=Hq, GROUP=Hq // Hkv, Nq=Nq, Nk=Nk, HEAD_D=D, HEAD_DV=Dv, lse_rs=lse_rs, scale=float(scale),
                  **sc)
    for pre_, t in (("sq", q), ("sk", k), ("sv", v), ("sdo", dout)):
        common.update(zip((pre_ + "b", pre_ + "h", pre_ + "n", pre_ + "d"), _strides(t)))
    key_extra = (_bucket(Nq), _bucket(Nk), softcap > 0, dropout_p > 0)
    kv_static = dict(common, BHK=B * Hkv, Hkv=Hkv,
                     **_mask_kwargs(m, q, triton.cdiv(Nk, m.map_bn) if m.has_map else 0, m.bwd))
    for pre_, st_ in (("sdk", g_strides[1]), ("sdv", g_strides[2])):
        kv_static.update(zip((pre_ + "b", pre_ + "h", pre_ + "n", pre_ + "d"), st_))
    q_static = dict(common, BH=B * Hq, **_mask_kwargs(m, q, triton.cdiv(Nq, m.map_bm) if m.has_map else 0, m.fwd))
    q_static.update(zip(("sdqb", "sdqh", "sdqn", "sdqd"), g_strides[0]))
    # atomic dQ: the (batch, kv head) pairs run in chunks whose float32 accumulator stays
    # within the budget (set_backward(dq_memory=...)); one chunk when it all fits
    units = B * Hkv
    if atomic and math.isfinite(_BWD["dq_memory"]):
        unit_bytes = (Hq // Hkv) * Nq * D * 4
        budget = _BWD["dq_memory"] * sum(t.numel() * t.element_size() for t in (q, k, v, q, k, v, out, dout))
        units = max(1, min(B * Hkv, int(budget // unit_bytes)))
    # TMA reductions into the accumulator on the GPU (and in compile-only checks) when D is a
    # power of two; atomic adds otherwise, in the interpreter and while tracing
    dq_tma = (atomic and (q.is_cuda or _HOOK[0] is not None) and not is_interpreter() and _pow2(D) == D
              and not _is_fake(q) and not torch.compiler.is_compiling())
    # stored dS: TMA stores of the dS tiles on the GPU (and in compile-only checks)
    ds_tma = (stored and (q.is_cuda or _HOOK[0] is not None) and not is_interpreter() and not _is_fake(q)
              and not torch.compiler.is_compiling())

    def kv_plan(c: TileConfig, c0: int = 0, span: int = 0) -> _Plan:
        # span > 0: the stored-dS pass, panels of span query rows per key block, chunks of `units`
        _check_config(c, m, "dkdv")
        for t in (q, k, v, dout, *(grads or ())):
            _check_offsets(t, max(c.block_m, c.block_n))
        n_units = min(units, B * Hkv - c0)
        st = dict(kv_static, **flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, num_warps=c.num_warps,
                  num_stages=c.num_stages, bhk0=c0, ATOMIC_DQ=atomic, DQ_TMA=dq_tma,
                  hgroup=_hgroup_kv(m, atomic or span > 0, max(Nq, Nk)), SPAN=span, STORE_DS=span > 0,
                  ACCUM=grads is not None,
                  **_edge_loops(m, "dkdv", Nq, Nk, c.block_m, c.block_n))
        if not atomic:
            st.update(DQA=_dummy(q, torch.float32), DQAD=_dummy(q, torch.float32))
        # every parameter named, defaults too: Inductor's analysis of a traced launch needs them all
        st.update(DS_TMA=ds_tma if span else False)
        if span == 0:
            st.update(DS=_dummy(q, q.dtype), DSD=_dummy(q, q.dtype))
        num_n = triton.cdiv(Nk, c.block_n)
        if m.has_map:
            st.update(_order_kwargs(m.bwd, lambda: _row_programs(
                B, Hkv, num_n, c.block_n, m.map_bn, kv_static["map_hs"], False, Hq // Hkv,
                q.device)[c0 * num_n:(c0 + n_units) * num_n]))
        descs = (("QD", "Q", c.block_m, flags["BLOCK_D"]), ("DOD", "DO", c.block_m, flags["BLOCK_DV"]))
        if span:              # the dS scratch's own descriptor (TMA stores), whatever c.tma says
            descs += (("DSD", "DS", c.block_n, c.block_m, ds_tma),)
        return _Plan(_attn_bwd_dkdv_kernel, (num_n * n_units,), st, c, "dkdv", descs)

    def q_plan(c: TileConfig, fuse: bool) -> _Plan:
        _check_config(c, m, "dq")
        for t in (q, k, v, dout, *(grads or ())):
            _check_offsets(t, max(c.block_m, c.block_n))
        st = dict(q_static, **flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n, USE_TMA=c.tma, num_warps=c.num_warps,
                  num_stages=c.num_stages, hgroup=_hgroup(m), ACCUM=grads is not None,
                  **_edge_loops(m, "dq", Nq, Nk, c.block_m, c.block_n))
        # fuse: the dQ launch runs first and does the preprocessing (see backward.py)
        st.update(zip(("sob", "soh", "son", "sod"), _strides(out) if fuse else (0, 0, 0, 0)), FUSE_PRE=fuse)
        if not fuse:
            st.update(O=_dummy(q, out.dtype), Lse=_dummy(q, torch.float32))
        if m.has_map:
            st.update(_order_kwargs(m.fwd, lambda: _row_programs(
                B, Hq, triton.cdiv(Nq, c.block_m), c.block_m, m.map_bm, q_static["map_hs"], True, 1, q.device)))
        descs = (("KD", "K", c.block_n, flags["BLOCK_D"]), ("VD", "V", c.block_n, flags["BLOCK_DV"]))
        return _Plan(_attn_bwd_dq_kernel, (triton.cdiv(Nq, c.block_m) * B * Hq,), st, c, "dq", descs)

    def scratch(i: int) -> torch.Tensor:     # autotuning only
        t = (q, k, v)[i]
        return torch.empty_like(t) if like[i] else torch.empty(t.shape, dtype=t.dtype, device=t.device)

    def bench_kv(c: TileConfig) -> None:
        z = torch.zeros((B * Hq, lse_rs), dtype=torch.float32, device=q.device)
        _run_plan(kv_plan(c), dict(Q=q, K=k, V=v, DO=dout, Lse2=z, Delta=z, DK=scratch(1), DV=scratch(2),
                                   **_dq_acc(q, units * (Hq // Hkv), c, dq_tma) if atomic else {}), 0)

    def bench_q(c: TileConfig) -> None:
        z = torch.zeros((B * Hq, lse_rs), dtype=torch.float32, device=q.device)
        extra = dict(O=out, Lse=torch.zeros((B, Hq, Nq), dtype=torch.float32, device=q.device)) if fuse else {}
        _run_plan(q_plan(c, fuse), dict(Q=q, K=k, V=v, DO=dout, Lse2=z, Delta=z, DQ=scratch(0), **extra), 0)

    c_kv = _choose("dkdva" if atomic else "dkdv", q, m, max(D, Dv), key_extra, bench_kv, _tma_ok(q, dout))
    if stored and not m.has_map:
        # stored dS: chunks of (batch, kv head) pairs whose scratch fits set_backward(ds_memory=...);
        # with not even one pair fitting, the two-pass form runs
        span = _ds_span(m, Nq, Nk, c_kv.block_m, c_kv.block_n)
        num_n = triton.cdiv(Nk, c_kv.block_n)
        unit_bytes = (Hq // Hkv) * num_n * c_kv.block_n * span * q.element_size()
        io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, q, k, v, out, dout))
        cap = min(_BWD["ds_memory"] * io_bytes, _free_device_bytes(q.device) / 2)
        fit = B * Hkv if not math.isfinite(cap) else int(cap // unit_bytes)
        if fit >= 1:
            units = min(B * Hkv, fit)
            kv_plans = tuple(kv_plan(c_kv, c0, span) for c0 in range(0, B * Hkv, units))
            ds_plans = tuple(_dq_ds_plan(k, q, m, c_kv, flags, c0 * (Hq // Hkv), min(units, B * Hkv - c0) * (Hq // Hkv),
                                         span, float(scale), g_strides[0]) for c0 in range(0, B * Hkv, units))
            shape = (units * (Hq // Hkv), num_n, c_kv.block_n, span)
            return _BwdPlans(pre_plan, kv_plans, None, like, 0, False, ds_plans, shape)
    kv_plans = tuple(kv_plan(c_kv, c0) for c0 in range(0, B * Hkv, units))
    if atomic:
        return _BwdPlans(pre_plan, kv_plans, None, like, units * (Hq // Hkv), False)
    c_q = _choose("dq", q, m, max(D, Dv), key_extra, bench_q, _tma_ok(k, v))
    return _BwdPlans(pre_plan, kv_plans, q_plan(c_q, fuse), like, 0, fuse)


@dataclass(frozen=True)
class _BwdPlans:
    """The launches of one backward: the preprocessing (unless ``fuse``), the dK/dV pass (one
    plan per chunk of (batch, kv head) pairs), then the two-pass dQ plan, or the atomic pass's
    accumulator rows, or the stored-dS pass's dQ plans (one per chunk) and scratch shape
    (query heads of a chunk, key blocks, key block rows, panel span)."""

    pre: _Plan
    kv: tuple
    q: _Plan | None
    like: tuple
    acc_rows: int
    fuse: bool
    ds: tuple = ()
    ds_shape: tuple = ()


def _free_device_bytes(device: torch.device) -> float:
    """Memory a new allocation can take on ``device`` now: the driver's free bytes plus what
    PyTorch's caching allocator holds unused (inf off CUDA). The stored-dS scratch takes at
    most half of it, so that the option chunks at long sequences instead of running out."""
    if device.type != "cuda":
        return math.inf
    free, _total = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _ds_span(m: MaskArgs, nq: int, nk: int, bm: int, bn: int) -> int:
    """Query rows per key block in the stored-dS scratch: the most rows (whole query blocks of
    ``bm``) any key block (of ``bn``) of any head visits, as the dK/dV loop's _q_block_range
    counts them (reads the window and document tensors once, when the plan is built)."""
    w = m.window.to(torch.int64)
    left, right = w[:, :1], w[:, 1:]                                        # (Hw, 1)
    n0 = torch.arange(0, nk, bn, device=w.device, dtype=torch.int64)[None, :]
    n_last = torch.clamp(n0 + bn, max=nk) - 1
    lo, hi = n0 - right, n_last + left + 1
    if m.doc_id is not None:
        doc = m.doc_id.to(torch.int64)
        rng = m.doc_range.reshape(-1).to(torch.int64)          # (start, end) per document
        lo = torch.maximum(lo, rng[2 * doc[n0 - m.doc_pmin]])
        hi = torch.minimum(hi, rng[2 * doc[n_last - m.doc_pmin] + 1])
    off = nk - nq
    lo = torch.clamp(lo - off, min=0)
    hi = torch.clamp(hi - off, max=nq)
    hi = torch.maximum(hi, lo)
    lo_b = lo // bm
    hi_b = torch.where(hi > lo, (hi + bm - 1) // bm, lo_b)
    return bm * max(1, int((hi_b - lo_b).max()))


_DQDS_BM: list[int | None] = [None]        # tests: force the stored-dS dQ pass's query tile


def _dq_ds_plan(k: torch.Tensor, q: torch.Tensor, m: MaskArgs, c: TileConfig, flags: dict, bh0: int, rows: int,
                span: int, scale: float, dq_strides: tuple) -> _Plan:
    """The stored-dS dQ launch of query-head rows bh0 .. bh0 + rows (one chunk), on the dK/dV
    config ``c``'s key blocks. Its own query tile: 128 rows on the GPU up to D = 128 (each K
    tile then serves 128 rows), else 64; the interpreter's tile on the CPU."""
    B, Hq, Nq, D = q.shape
    if q.is_cuda:
        bm, warps, stages = (128, 8, 3) if flags["BLOCK_D"] <= 128 else (64, 4, 2)
    else:
        bm, warps, stages = c.block_m, c.num_warps, c.num_stages
    bm = _DQDS_BM[0] or bm
    st = dict(WIN=m.window, DOC_ID=m.doc_id if m.doc_id is not None else _dummy(q),
              DOC_RANGE=m.doc_range if m.doc_range is not None else _dummy(q),
              bh0=bh0, Hq=Hq, GROUP=Hq // k.shape[1], Nq=Nq, Nk=k.shape[2], HEAD_D=D, SPAN=span,
              win_hs=1 if m.window.shape[0] > 1 else 0, doc_pmin=m.doc_pmin, scale=scale,
              BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_D=flags["BLOCK_D"], EVEN_D=_pow2(D) == D, KV_BM=c.block_m,
              HAS_DOCS=m.doc_id is not None, DOT_PREC=flags["DOT_PREC"], I64=flags["I64"], USE_TMA=c.tma,
              num_warps=warps, num_stages=stages)
    st.update(zip(("skb", "skh", "skn", "skd"), _strides(k)))
    st.update(zip(("sdqb", "sdqh", "sdqn", "sdqd"), dq_strides))
    cfg = TileConfig(bm, c.block_n, warps, stages, c.tma)
    return _Plan(_attn_bwd_dq_ds_kernel, (rows * triton.cdiv(Nq, bm),), st, cfg, "dqds",
                 (("KD", "K", c.block_n, flags["BLOCK_D"]),))


def _lse_rs(nq: int, m: MaskArgs) -> int:
    """Row stride of the backward's lse2 and delta buffers: past the last query row any
    tile of the dK/dV loop reaches (the map's last row block, or a tile of at most 128 rows),
    rounded up to 128 (a whole number of preprocessing blocks), so that loop's unmasked
    per-tile loads stay inside the padded row."""
    reach = -(-nq // m.map_bm) * m.map_bm if m.has_map else nq
    return -(-reach // 128) * 128


def _dq_acc(q: torch.Tensor, rows: int, c: TileConfig, tma: bool) -> dict:
    """The zeroed float32 dQ accumulator (1, rows, Nq, D) of an atomic-dQ launch, and its
    TMA descriptor ([1, 1, BLOCK_M, D] blocks) or the accumulator again."""
    acc = torch.zeros((1, rows, q.shape[2], q.shape[3]), dtype=torch.float32, device=q.device)
    return dict(DQA=acc, DQAD=_desc(acc, c.block_m, q.shape[3], True) if tma else acc)


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
             lse: torch.Tensor, m: MaskArgs, *, scale: float, softcap: float = 0.0, dropout_p: float = 0.0,
             seed: int = 0, dlse: torch.Tensor | None = None,
             accumulate_into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: the dQ kernel, which also computes delta and lse2, then the dK/dV
    kernel; with ``dlse`` or the atomic strategy, a preprocessing kernel (delta, lse2) first.

    Args:
        q, k, v, m, scale, softcap, dropout_p, seed: as :func:`forward`.
        out, dout: (B, Hq, Nq, Dv), the output and its gradient (any strides).
        lse: float32 (B, Hq, Nq), natural log; dlse: optional gradient of lse.
        accumulate_into: optional (dq, dk, dv) tensors shaped like q, k, v, in their dtype and
            on their device, any strides (views too): the kernels add the gradients to them
            in place (read, add in float32, write) instead of allocating new ones. Runs the
            two-pass backward whatever :func:`set_backward` says.
    Returns:
        dq, dk, dv with the shapes (and dense layouts) of q, k, v; with ``accumulate_into``,
        those tensors.
    """
    B, Hq, Nq = q.shape[:3]
    if tuple(lse.shape) != (B, Hq, Nq):
        raise ValueError(f"lse must be ({B}, {Hq}, {Nq}), got {tuple(lse.shape)}")
    if accumulate_into is not None:
        check_accumulate_into(accumulate_into, q, k, v)
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    poison = _poison()
    key = None if _tracing(q, k, v, out, dout) else ("bwd", _meta(q), _meta(k), _meta(v), _meta(out), _meta(dout),
                                                     m, float(scale), float(softcap), float(dropout_p), _VERSION[0],
                                                     poison, _HGROUP[0], _HGROUP_KV[0], _HGROUP_TAGS[0])
    acc = accumulate_into is not None
    # graphs record the two-pass form; accumulating runs it too
    atomic = _atomic_dq() and not acc and not _tracing(q, k, v, out, dout)
    stored = _BWD["mode"] == "stored_ds" and not acc and not _tracing(q, k, v, out, dout)
    fuse = not atomic and dlse is None and _FUSE_PRE[0]    # dQ launch does the preprocessing
    if key is not None and acc:
        key += ("acc",) + tuple(_meta(g) for g in accumulate_into)
    plans = _cached(
        None if key is None else key + (atomic, _BWD["dq_memory"], fuse, stored, _BWD["ds_memory"]),
        lambda: _bwd_plan(q, k, v, out, dout, m, scale, softcap, dropout_p, atomic, fuse, stored,
                          tuple(accumulate_into) if acc else None))
    pre_plan, kv_ps, q_p, like, fuse = plans.pre, plans.kv, plans.q, plans.like, plans.fuse
    rows = torch.empty((2, B * Hq, pre_plan.static["lse_rs"]), dtype=torch.float32, device=q.device)
    if poison:        # the preprocessing must write the padding too (the dK/dV loop reads it)
        rows.fill_(float("nan"))
    delta, lse2 = rows
    if not fuse:
        _run_plan(pre_plan, dict(O=out, DO=dout, Lse=lse, Delta=delta, Lse2=lse2), 0)
    if dlse is not None:
        delta = delta - torch.nn.functional.pad(dlse.to(torch.float32).reshape(B * Hq, Nq), (0, delta.shape[1] - Nq))
    if acc:
        dq, dk, dv = accumulate_into
    else:
        dq, dk, dv = (torch.empty_like(t) if lk else torch.empty(t.shape, dtype=t.dtype, device=t.device)
                      for t, lk in zip((q, k, v), like))
        if poison:
            for t in (dq, dk, dv):
                t.fill_(float("nan"))
    base = dict(Q=q, K=k, V=v, DO=dout, Lse2=lse2, Delta=delta)
    # accumulating (the ring): the Gluon passes add in their epilogue, so the gradients must be
    # TMA-compatible too
    gluon_kv = q_p is not None and _gluon_pass_wanted("dkdv", q, k, v, (dout, dk, dv) if acc else (dout,), m,
                                                      softcap, dropout_p)
    # the Gluon dQ pass (hopper_dq.py) where the Gluon kernels run; MEMATTN_GLUON_DQ=0: the Triton one
    gluon_q = fuse and _gluon_pass_wanted("dq", q, k, v, (dout, out, dq) if acc else (dout, out), m, softcap,
                                          dropout_p)

    def run_q() -> None:
        if gluon_q:
            plan = _cached(key + ("gdq",), lambda: hopper_dq.dq_plan(q, k, m.window, m.doc_id, m.doc_range,
                                                                    m.doc_pmin, scale, lse2.shape[1], acc))
            hopper_dq.run_dq(plan, q, k, v, out, dout, lse, dq, lse2, delta)
            _COUNTS["gluon"] += 1
        else:
            _run_plan(q_p, dict(base, DQ=dq, O=out, Lse=lse), seed)

    def run_kv() -> None:
        if gluon_kv:
            plan = _cached(key + ("gdkdv",), lambda: hopper.dkdv_plan(q, k, m.window, m.doc_id, m.doc_range,
                                                                      m.doc_pmin, scale, lse2.shape[1], acc))
            hopper.run_dkdv(plan, q, k, v, dout, dk, dv, lse2, delta)
            _COUNTS["gluon"] += 1
        else:
            _run_plan(kv_ps[0], dict(base, DK=dk, DV=dv), seed)
    if fuse:              # dQ first: it writes delta and lse2, which the dK/dV launch reads
        run_q()
        run_kv()
        return dq, dk, dv
    if q_p is not None:
        run_kv()
        _run_plan(q_p, dict(base, DQ=dq), seed)
        return dq, dk, dv
    if plans.ds:                          # stored dS: per chunk, dK/dV (writes dS), then dQ from it
        ds = torch.empty(plans.ds_shape, dtype=q.dtype, device=q.device)
        if poison:
            ds.fill_(float("nan"))
        for kv_p, ds_p in zip(kv_ps, plans.ds):
            _run_plan(kv_p, dict(base, DK=dk, DV=dv, DS=ds), seed)
            _run_plan(ds_p, dict(K=k, DQ=dq, DS=ds), seed)
        return dq, dk, dv
    acc_rows = plans.acc_rows
    acc = None
    for p in kv_ps:                       # atomic dQ: chunks of (batch, kv head) pairs
        if acc is None:
            acc = _dq_acc(q, acc_rows, p.cfg, bool(p.static["DQ_TMA"]))
        else:
            acc["DQA"].zero_()
        _run_plan(p, dict(base, DK=dk, DV=dv, **acc), seed)
        r0 = p.static["bhk0"] * (Hq // k.shape[1])
        rows = p.grid[0] // triton.cdiv(k.shape[2], p.cfg.block_n) * (Hq // k.shape[1])
        _copy_rows(dq, acc["DQA"][0, :rows], r0)
    return dq, dk, dv


def _copy_rows(dq: torch.Tensor, acc: torch.Tensor, r0: int) -> None:
    """dq viewed as (B * Hq) rows of (Nq, D): rows r0 .. r0 + len(acc) = acc, cast to dq's dtype."""
    Hq = dq.shape[1]
    r, n = r0, acc.shape[0]
    while n:
        b, h = divmod(r, Hq)
        take = min(n, Hq - h)
        dq[b, h:h + take].copy_(acc[r - r0:r - r0 + take])
        r, n = r + take, n - take


# The backward's strategy (set_backward): "two_pass" (a dK/dV pass, then a dQ pass; no atomics,
# bit-identical across runs) or "atomic" (one pass adding each tile's dS K into a float32 dQ
# accumulator). Two-pass is the default: on the H200 the atomic pass was 0.64-0.94x its speed
# at D = 128 and 0.79-1.06x at D = 64, chunked as dq_memory = 0.04 asks, and 0.80-0.94x /
# 0.91-1.39x with the whole accumulator at once (benchmarks/h200_tune_atomic.json). dq_memory
# caps the atomic pass's accumulator as a fraction of the bytes of q, k, v, out, dout and the
# three gradients (inf: no cap, one launch; the accumulator is then 2 bytes per element of dq).
_BWD_MODES = ("two_pass", "atomic", "stored_ds")
_BWD = {"mode": os.environ.get("MEMATTN_TRITON_BWD", "two_pass"),
        "dq_memory": float(os.environ.get("MEMATTN_TRITON_DQ_MEMORY", "inf")),
        "ds_memory": float(os.environ.get("MEMATTN_TRITON_DS_MEMORY", "inf"))}
if _BWD["mode"] not in _BWD_MODES:
    raise ValueError(f"MEMATTN_TRITON_BWD must be one of {_BWD_MODES}, got {_BWD['mode']!r}")
# Two-pass: the dQ launch computes delta / lse2 itself instead of a preprocessing launch
# (MEMATTN_TRITON_FUSE_PRE=0, or _FUSE_PRE[0] = False, restores the separate kernel: A/B timing).
_FUSE_PRE = [os.environ.get("MEMATTN_TRITON_FUSE_PRE", "1") != "0"]


def set_backward(mode: str | None = None, dq_memory: float | None = None,
                 ds_memory: float | None = None) -> None:
    """Choose the Triton backward's strategy (for every later backward on CUDA or the CPU
    interpreter).

    Args:
        mode: ``"two_pass"`` (the default: a dK/dV pass over key blocks, then a dQ pass over
            query blocks; no atomics, bit-identical across runs), ``"atomic"`` (one pass:
            each tile's dS K is added into a float32 dQ accumulator, five tile products per
            tile pair instead of seven; not bit-identical across runs, and measured slower on
            the H200 except for short documents at D = 64: docs/performance.md) or
            ``"stored_ds"`` (the dK/dV pass also writes each tile's dS, in q's dtype, to a
            scratch buffer, and the dQ pass reads it back: five tile products per tile pair,
            no atomics, bit-identical across runs). Meant for sliding windows and documents,
            whose scratch is about ``Nk * (window + one key tile)`` or ``Nk * longest
            document`` elements per query head; a full or causal mask would need ``Nk * Nq``
            (cap it with ``ds_memory``). Block-map masks run two-pass.
            While ``torch.are_deterministic_algorithms_enabled()`` the atomic form does not run,
            and in graphs traced by ``torch.compile`` on the GPU the two-pass form runs.
            Env: MEMATTN_TRITON_BWD.
        dq_memory: cap of the atomic pass's float32 accumulator as a fraction of the bytes
            of q, k, v, out, dout and the three gradients (> 0, ``inf`` = no cap, the default).
            Under a cap the (batch, kv head) pairs run in chunks that fit, at least one pair
            per chunk. Env: MEMATTN_TRITON_DQ_MEMORY.
        ds_memory: the same cap for the stored-dS scratch (``inf`` = no cap, the default).
            On the GPU the scratch also takes at most half of the memory free when the
            backward's plan is built (cached per problem). When not even one (batch, kv head)
            pair fits, that backward runs two-pass. Env: MEMATTN_TRITON_DS_MEMORY.

    Example:
        >>> set_backward("stored_ds", ds_memory=2.0); set_backward("two_pass", ds_memory=float("inf"))
    """
    if mode is not None:
        if mode not in _BWD_MODES:
            raise ValueError(f"mode must be one of {_BWD_MODES}, got {mode!r}")
        _BWD["mode"] = mode
    for name, val in (("dq_memory", dq_memory), ("ds_memory", ds_memory)):
        if val is not None:
            if not (val > 0):
                raise ValueError(f"{name} must be > 0, got {val!r}")
            _BWD[name] = float(val)
    _VERSION[0] += 1


@contextlib.contextmanager
def using_backward(mode: str | None = None, dq_memory: float | None = None,
                   ds_memory: float | None = None) -> Iterator[None]:
    """:func:`set_backward` inside the block only (benchmarks, tests).

    Example:
        >>> with using_backward("atomic"):
        ...     pass
    """
    old = dict(_BWD)
    set_backward(mode, dq_memory, ds_memory)
    try:
        yield
    finally:
        _BWD.update(old)
        _VERSION[0] += 1


def _atomic_dq() -> bool:
    return _BWD["mode"] == "atomic" and not torch.are_deterministic_algorithms_enabled()
