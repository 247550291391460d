"""Tile configs of the Triton attention kernels: the candidate lists per kernel, dtype and
padded head dim (first entry = default), the defaults for short sequences, band masks and
decoding, and the lookup that filters them for a block map. Pure data and lookups; the
launcher (:mod:`.launch`) chooses among them (or autotunes) and builds the grids.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["TileConfig", "candidates"]


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel. For the key-block (dK/dV) kernel,
    ``block_n`` is the program's key block and ``block_m`` the query tile it loops over."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False      # load the looped-over tiles with TMA (host tensor descriptors)


# ----------------------------------------------------------------------------- configs
_T = TileConfig
# 16-bit inputs on a Hopper-class GPU, by padded head dim. First entry = default.
_GPU16 = {
    # checked offline for sm_90 (scripts/gpu_triton.py --aot): no spills in the inner loops,
    # except where noted; the GPU autotune picks among them.
    "fwd": {32: [_T(128, 64, 4, 3), _T(128, 128, 8, 3)],
            64: [_T(128, 64, 4, 3), _T(128, 128, 8, 3), _T(128, 64, 8, 3), _T(128, 64, 4, 3, True),
                 _T(128, 128, 8, 3, True)],
            128: [_T(128, 64, 8, 3), _T(128, 64, 8, 3, True), _T(128, 64, 8, 4, True), _T(128, 128, 8, 2, True),
                  _T(128, 128, 8, 2), _T(64, 64, 4, 3)],
            256: [_T(64, 32, 4, 3), _T(64, 64, 8, 2)]},
    # 16 warps (FlexAttention's H100 backward default for D = 128 in recent torch) took
    # 1.3-2.2x the time for both kernels at D = 128 (benchmarks/h200_tune_16warps.json; the
    # 128-register cap spills 92-2196 bytes), so none is listed.
    # dK/dV and dQ defaults from scripts/gpu_tune.py on the H200 (benchmarks/h200_tune.json,
    # 2026-11-29): D = 128 (64, 128, 8, 3) is 4-8% faster than (32, 128, 8, 3) from 4k on
    # (sm_90 ptxas: ~25 spilled words per iteration then, 4-5 since session 6's unmasked
    # lse / delta loads), and short sequences take _GPU16_SHORT below; D = 64 (32, 128, 4, 3)
    # 13-19% and dQ (64, 64, 4, 3) 4-7% (both replaced in session 6, below).
    # Session 6, after the prologue / epilogue loads and stores became 16-byte vectors
    # (benchmarks/h200_tune_session6.json): D = 64 dK/dV (64, 64, 4, 3) 5% faster at 1k causal,
    # within 2% elsewhere (1.3-7.7% faster everywhere in the same sweep one call earlier);
    # dQ with TMA, (128, 64, 8, 3), 0.3-5.1% faster at D = 128 and 2.5-7.9% at D = 64, from 1k
    # to 16k, full and causal (without aligned strides the next entry runs).
    "dkdv": {32: [_T(64, 128, 8, 3), _T(64, 64, 4, 3)],
             64: [_T(64, 64, 4, 3), _T(32, 128, 4, 3), _T(64, 128, 8, 3), _T(32, 128, 8, 3),
                  _T(64, 128, 8, 3, True)],
             128: [_T(64, 128, 8, 3), _T(32, 128, 8, 3), _T(32, 64, 4, 3), _T(64, 64, 8, 3),
                   _T(32, 128, 8, 3, True), _T(64, 128, 8, 3, True)],
             256: [_T(32, 64, 8, 2), _T(32, 64, 4, 2)]},
    # the one-pass backward (dK/dV with atomic dQ, launch.set_backward("atomic")): five tile
    # products per step, so 8 warps at D = 128. Order from scripts/gpu_tune.py --kernels
    # dkdva on the H200 (benchmarks/h200_tune_atomic.json, 2026-11-30): D = 128 (64, 128, 8, 3)
    # fastest for full, causal and window 1024 at 1k-16k (although sm_90 ptxas reports 396
    # spilled bytes), (64, 64, 8, 2) for short documents; D = 64 (64, 64, 4, 3).
    "dkdva": {32: [_T(64, 64, 4, 3), _T(64, 128, 8, 3)],
              64: [_T(64, 64, 4, 3), _T(64, 128, 8, 3), _T(32, 128, 8, 3), _T(64, 128, 8, 3, True)],
              128: [_T(64, 128, 8, 3), _T(64, 64, 8, 2), _T(32, 128, 8, 3), _T(64, 64, 8, 3), _T(32, 64, 8, 3),
                    _T(32, 128, 8, 3, True)],
              256: [_T(16, 64, 8, 2), _T(32, 64, 8, 2)]},
    "dq": {32: [_T(128, 64, 8, 3), _T(64, 64, 4, 3)],
           64: [_T(128, 64, 8, 3, True), _T(64, 64, 4, 3), _T(128, 64, 8, 3), _T(128, 128, 8, 2)],
           128: [_T(128, 64, 8, 3, True), _T(128, 64, 8, 3), _T(64, 64, 4, 3), _T(128, 128, 8, 2)],
           256: [_T(64, 64, 8, 2), _T(64, 32, 4, 2)]},
}
# Defaults for sequences of at most _SHORT_N[kernel] queries and keys (more programs, shorter
# loops): D = 128 dK/dV (32, 64, 4, 3) was 10-13% faster at N = 1k and 4k causal, equal at 4k
# full; session 6 (vectorised prologue / epilogue, h200_tune_session6.json): at 4k the long
# default (64, 128, 8, 3) is 6% faster causal and equal full, at 1k (32, 64, 4, 3) still 5%
# faster causal (1% slower full), so its limit is 2k (2k itself not timed).
# D = 128 forward (64, 64, 4, 3): 7% / 15% faster than (128, 64, 8, 3) at N = 1k full / causal
# (benchmarks/h200_tune_1k.json, 2026-11-30). At 4k it was chosen by inference (3% faster on
# 16 causal documents of 4096 tokens, h200_tune_band.json); session 5's dense run with it
# measured 473 / 389 TFLOP/s (full / causal) against 466 / 380 in session 3's with (128, 64,
# 8, 3) (two runs, not a same-run comparison).
_SHORT_N = {"fwd": 4096, "dkdv": 2048}
_GPU16_SHORT = {"fwd": {128: _T(64, 64, 4, 3)}, "dkdv": {128: _T(32, 64, 4, 3)}}
# Causal forwards of at most _CAUSAL_SHORT_N queries and keys (on average half the key blocks
# of a full mask per program): session 7's sweep after the empty edge loops were compiled out
# (benchmarks/h200_tune_session7_fwd1k.json) found D = 64 (64, 64, 4, 2) 8.6% faster than the
# dense default (128, 64, 4, 3) at N = 1k causal, but 6% slower at 1k full; at D = 128 the
# short default (64, 64, 4, 3) stayed best (tied with (64, 32, 4, 3)). 2k and 4k not timed.
_CAUSAL_SHORT_N = 1024
_GPU16_CAUSAL_SHORT = {"fwd": {64: _T(64, 64, 4, 2)}}
# Band masks (sliding windows and documents, parametric path), D = 128: each program's loop
# is bounded by the window or the document, and smaller tiles win. scripts/gpu_tune.py
# --masks window1024,documents16_causal on the H200 (benchmarks/h200_tune_band.json,
# 2026-11-30): forward (64, 64, 4, 3) 12-13% faster than the dense default for window 1024 at
# 16k and 64k, 15% / 3% for 16 causal documents at 16k / 64k; dK/dV (32, 64, 4, 3) 13%
# faster than the previous band default (32, 128, 8, 3) for the window, 16% / 3% faster than
# the dense default for the documents. (The dense dK/dV default (64, 128, 8, 3) had made
# window-1024 fwd+bwd 3-6% slower, session 3.)
# D = 64 dK/dV (64, 64, 4, 3): 10-13% faster than (32, 128, 4, 3) for 16 causal documents at
# 1k-16k, 0.4-1.1% for window 1024 (benchmarks/h200_tune_atomic.json, its two-pass rows).
# Documents of at least launch._LONG_DOC tokens on average (4096) take the dense defaults
# instead (session 12: forward+backward 1.8% faster for 16 documents of 4096 tokens).
_GPU16_BAND = {"fwd": {128: _T(64, 64, 4, 3)}, "dkdv": {128: _T(32, 64, 4, 3), 64: _T(64, 64, 4, 3)}}
# Forward defaults for at most _DECODE_N queries (decoding): a 128-row query tile would be
# almost all padding; 16 rows is the smallest tensor-core tile.
_DECODE_N = 16
_GPU16_DECODE = {"fwd": {32: _T(16, 64, 4, 3), 64: _T(16, 64, 4, 3), 128: _T(16, 64, 4, 3),
                         256: _T(16, 32, 4, 3)}}
# Block-map launches with 64 x 64 map blocks (block-aligned patterns such as bigbird(64)).
_GPU16_MAP64 = {
    "fwd": {32: [_T(64, 64, 4, 3)], 64: [_T(64, 64, 4, 3), _T(64, 64, 8, 3)],
            128: [_T(64, 64, 4, 3), _T(64, 64, 8, 3), _T(64, 32, 4, 3), _T(64, 64, 4, 3, True)],
            256: [_T(64, 32, 4, 3)]},
    "dkdv": {32: [_T(64, 64, 4, 3)], 64: [_T(64, 64, 4, 3), _T(32, 64, 4, 3)],
             128: [_T(64, 64, 8, 3), _T(32, 64, 4, 3), _T(64, 64, 4, 3), _T(64, 64, 4, 3, True)],
             256: [_T(32, 64, 4, 2)]},
    "dq": {32: [_T(64, 64, 4, 3)], 64: [_T(64, 64, 4, 3), _T(64, 64, 8, 3)],
           128: [_T(64, 64, 4, 3), _T(64, 64, 8, 3), _T(64, 64, 4, 3, True)], 256: [_T(64, 32, 4, 2)]},
}
_GPU32 = {  # float32 (no tensor cores with input_precision="ieee"): small tiles
    k: {d: [_T(32, 32, 4, 2)] for d in (32, 64, 128, 256)} for k in ("fwd", "dkdv", "dq")
}
# The CPU interpreter: small tiles (tests run tiny problems; several tiles per row).
_INTERP = {"fwd": [_T(32, 32, 1, 1)], "dkdv": [_T(32, 32, 1, 1)], "dq": [_T(32, 32, 1, 1)]}


def _pow2(x: int) -> int:
    return max(16, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def candidates(kernel: str, dtype: torch.dtype, head_dim: int, device_type: str,
               map_block: tuple[int, int] | None = None, seq_len: int | None = None,
               q_len: int | None = None, band: bool = False, causal: bool = False) -> list[TileConfig]:
    """Candidate tile configs of ``kernel`` ("fwd", "dkdv", "dq"; "dkdva": the dK/dV pass with
    atomic dQ, which falls back to the "dkdv" lists where it has none), default first; with a
    map block, only tiles dividing it (a fitting fallback if none does). ``seq_len`` (the
    longer of Nq and Nk) selects the short-sequence default, ``q_len`` (Nq) the decoding one
    and ``band`` (a sliding window or documents on the parametric path: loops bounded by
    the mask) the band one, ``causal`` (a plain causal mask) with a short ``seq_len`` the
    short causal one, where they exist.

    Example:
        >>> candidates("fwd", torch.float32, 64, "cpu")[0]
        TileConfig(block_m=32, block_n=32, num_warps=1, num_stages=1, tma=False)
    """
    short = seq_len is not None and seq_len <= _SHORT_N.get(kernel, 0)
    decode = q_len is not None and q_len <= _DECODE_N
    causal_short = causal and seq_len is not None and seq_len <= _CAUSAL_SHORT_N
    return list(_candidates(kernel, dtype, _pow2(head_dim), device_type,
                            None if map_block is None else tuple(map_block), short, decode, band, causal_short))


@functools.lru_cache(maxsize=256)
def _candidates(kernel: str, dtype: torch.dtype, head_dim: int, device_type: str,
                map_block: tuple[int, int] | None, short: bool = False,
                decode: bool = False, band: bool = False, causal_short: bool = False) -> tuple[TileConfig, ...]:
    if device_type != "cuda":
        cands = list(_INTERP.get(kernel, _INTERP["dkdv"]))
    else:
        bd = min(max(_pow2(head_dim), 32), 256)
        if dtype == torch.float32:
            table = _GPU32
        elif map_block is not None and map_block[0] > 0 and max(map_block) <= 64:
            table = _GPU16_MAP64
        else:
            table = _GPU16
        if kernel not in table:
            kernel = "dkdv"
        cands = list(table[kernel][bd])
        first = _GPU16_SHORT.get(kernel, {}).get(bd) if short and table is _GPU16 else None
        if band and table is _GPU16:
            first = _GPU16_BAND.get(kernel, {}).get(bd, first)
        if causal_short and table is _GPU16:
            first = _GPU16_CAUSAL_SHORT.get(kernel, {}).get(bd, first)
        if decode and table is _GPU16:
            first = _GPU16_DECODE.get(kernel, {}).get(bd, first)
        if first is not None:
            cands = [first] + [c for c in cands if c != first]
    if map_block is not None and map_block[0] > 0:
        bm, bn = map_block
        # TMA only with one sub-tile per map tile: every load site gets its own buffers, and
        # two sub-tiles x two lists overflow the 227 KiB of shared memory.
        ok = [c for c in cands if bm % c.block_m == 0 and bn % c.block_n == 0
              and not (c.tma and (bm != c.block_m or bn != c.block_n))
              and not (kernel == "dq" and c.block_m * c.block_n >= 128 * 128)]   # > 227 KiB shared
        if not ok:
            c = cands[0]
            ok = [TileConfig(math.gcd(c.block_m, bm), math.gcd(c.block_n, bn), c.num_warps, c.num_stages)]
        cands = ok
    return tuple(cands)
