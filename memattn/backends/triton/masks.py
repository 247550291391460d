"""Pattern -> kernel-facing mask description (the one place that looks at pattern classes).

The Triton kernels know two ways of restricting the (query, key) pairs:

* **parametric** (no block map): a key window ``q_pos - left <= kv_pos <= q_pos + right``
  per head (``full`` is the window (inf, inf), ``causal`` is (inf, 0)) and optionally
  document ids (packed sequences). The kernel computes each query block's key range, splits
  it into blocks every row allows (no predicate) and edge blocks (predicate evaluated in
  the kernel). Nothing of size N^2/B^2 exists: a causal problem at N = 1M costs two ints.
* **block map + bit tiles**: the pattern's :class:`~memattn.patterns.BlockMap` (CSR), split
  into a list of full tiles (no predicate, no bounds) and a list of masked tiles; every
  masked tile carries a packed bit tile (``MAP_BM x MAP_BN`` bits, built on the device by
  evaluating ``pattern.mask`` on that tile's positions only). Any pattern works this way.

Windows, causal, their intersections and unions, and documents (alone or intersected with
a window) take the parametric path; everything else the block map path.
:func:`describe` can force the block map path for any pattern (tests use it to check that
both paths agree on every family).

Bit tile layout: ``bits[b, t, r // 32, c]`` int32 holds bit ``r % 32`` of row ``r``, column
``c`` of masked tile t (batch b, only for batch-dependent ``from_mask_mod`` patterns), so that
loads are contiguous along the key axis.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from ...patterns import Pattern
from ...patterns.base import Intersection, Union
from ...patterns.local import Full, SlidingWindow

__all__ = ["MaskSpec", "describe", "parametric_window", "map_blocks_for", "DEFAULT_MAP_BLOCKS"]

# Candidate map block sizes (query block, key block) for the block-map path, best first.
DEFAULT_MAP_BLOCKS: tuple[tuple[int, int], ...] = ((128, 128), (64, 64))
# Work budget (elements) of one chunk when evaluating partial tiles.
_BITS_CHUNK = 1 << 22
# Relative cost of a tile (per pair) by map block, and the extra of a masked tile.
_TILE_COST = {(128, 128): 1.0, (128, 64): 1.1, (64, 128): 1.15, (64, 64): 1.4}
_MASKED_EXTRA = 0.15


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """What the kernels need to restrict the pairs of one (nq, nk) problem.

    Shapes (all on the problem's device):
        window     int32 (Hw, 2): [left, right] per head (Hw = 1 or H), clamped to nq + nk.
        doc_id     int32 (nk - pmin,): document of each position in [pmin, nk), 0 = none
                   (positions before 0, when nq > nk); documents are numbered from 1.
        doc_range  int32 (n_docs + 1, 2): [start, end) positions of each document (row 0: empty).
        fwd        (row_masked int64, col_masked int32, bit_masked int32, row_full int64,
                   col_full int32): tiles per (head, query map block) row, CSR.
        bwd        the same per (head, key map block) row (tiles transposed).
        bits       int32 (Bb, n_masked, map_bm // 32, map_bn): packed bit tiles.
        On the map path of a band-and-globals pattern (Longformer, global tokens; see
        :func:`band_and_globals`) ``window`` holds the band and ``doc_id`` a global flag per
        position instead (1 = global), and ``bits`` is empty: the kernels evaluate the
        predicate on the partial tiles.

    Attributes:
        path: "param" or "map".
        map_block: (map_bm, map_bn) for the map path; kernel blocks must divide them.
        map_heads: Hm of the map (1 or H).
        info: build statistics (tiles, masked tiles, bytes, seconds, where bits were evaluated).
    """

    path: str
    nq: int
    nk: int
    window: torch.Tensor | None = None
    doc_id: torch.Tensor | None = None
    doc_range: torch.Tensor | None = None
    doc_pmin: int = 0
    map_block: tuple[int, int] = (0, 0)
    map_heads: int = 1
    fwd: tuple[torch.Tensor, ...] | None = None
    bwd: tuple[torch.Tensor, ...] | None = None
    bits: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def has_docs(self) -> bool:
        return self.doc_id is not None

    @property
    def is_param(self) -> bool:
        return self.path == "param"

    def nbytes(self) -> int:
        """Bytes of device memory held by this description."""
        ts = [self.window, self.doc_id, self.doc_range, self.bits, *(self.fwd or ()), *(self.bwd or ())]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ----------------------------------------------------------------------------- parametric
def _per_head(value: int | tuple[int, ...], heads: int) -> list[int]:
    if isinstance(value, tuple):
        return list(value)
    return [int(value)] * heads


def _combine_heads(a: list[int], b: list[int], op) -> list[int]:
    if len(a) == 1 and len(b) > 1:
        a = a * len(b)
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    return [op(x, y) for x, y in zip(a, b)]


def parametric_window(pattern: Pattern | None) -> tuple[list[int], list[int], Pattern | None] | None:
    """(left per head, right per head, document pattern or None) if the pattern is a window
    (full, causal, sliding_window, their & and |) optionally intersected with one document
    pattern; None when it needs the block map.

    Example:
        >>> from memattn import patterns
        >>> parametric_window(patterns.causal() & patterns.sliding_window(4))
        ([4], [0], None)
    """
    from ...patterns.document import Document

    big = 1 << 62
    if pattern is None or type(pattern) is Full:
        return [big], [big], None
    if type(pattern) is SlidingWindow:
        heads = pattern.num_heads or 1
        return _per_head(pattern.left, heads), _per_head(pattern.right, heads), None
    if type(pattern) is Document:
        return [big], [big], pattern
    if type(pattern) in (Intersection, Union):
        a, b = parametric_window(pattern.a), parametric_window(pattern.b)
        if a is None or b is None:
            return None
        if type(pattern) is Intersection:
            if a[2] is not None and b[2] is not None and a[2] != b[2]:
                return None
            return _combine_heads(a[0], b[0], min), _combine_heads(a[1], b[1], min), a[2] or b[2]
        # A union of windows that all contain the diagonal (left, right >= 0) is a window.
        if a[2] is not None or b[2] is not None:
            return None
        return _combine_heads(a[0], b[0], max), _combine_heads(a[1], b[1], max), None
    return None


def _document_arrays(doc: Pattern, nq: int, nk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """doc_id over positions [pmin, nk) (0 = no document) and [start, end) of each document."""
    doc = doc.for_sizes(nq, nk)
    pmin = min(0, nk - nq)
    pos = torch.arange(pmin, nk, dtype=torch.int64)
    ids = doc.doc_ids(pos) + 1                                  # -1 (none) -> 0
    n_docs = int(ids.max()) if ids.numel() else 0
    starts = torch.full((n_docs + 1,), 0, dtype=torch.int64)
    ends = torch.full((n_docs + 1,), 0, dtype=torch.int64)
    valid = ids > 0
    vid, vpos = ids[valid], pos[valid]
    if vid.numel():
        starts.scatter_reduce_(0, vid, vpos, reduce="amin", include_self=False)
        ends.scatter_reduce_(0, vid, vpos + 1, reduce="amax", include_self=False)
    rng = torch.stack([starts, ends], 1).to(torch.int32)
    return ids.to(torch.int32).to(device), rng.to(device), pmin


def _param_spec(win: tuple[list[int], list[int], Pattern | None], nq: int, nk: int, heads: int,
                device: torch.device) -> MaskSpec:
    left, right, doc = win
    if len(left) not in (1, heads) or len(right) not in (1, heads):
        raise ValueError(f"pattern varies over {max(len(left), len(right))} heads but q has {heads}")
    cap = nq + nk
    w = torch.tensor([[min(max(l_, 0), cap), min(max(r, 0), cap)] for l_, r in zip(left, right)],
                     dtype=torch.int32).to(device)
    doc_id = doc_range = None
    pmin = 0
    if doc is not None:
        doc_id, doc_range, pmin = _document_arrays(doc, nq, nk, device)
    unbounded = all(l_ >= cap for l_ in left) and all(r >= cap for r in right)
    causal = all(r == 0 for r in right) and all(l_ >= cap for l_ in left)
    tag = ("full" if unbounded else "causal" if causal else "window") + ("+docs" if doc is not None else "")
    return MaskSpec("param", nq, nk, window=w, doc_id=doc_id, doc_range=doc_range, doc_pmin=pmin,
                    info={"path": "param", "heads": w.shape[0], "docs": doc is not None, "tag": tag})


# ----------------------------------------------------------------------------- block map
def band_and_globals(p: Pattern, heads: int) -> tuple[list[int], list[int], tuple[int, ...]] | None:
    """(left per head, right per head, global positions) when ``p`` is "a band |q − k| within
    [−right, left], or q or k global" (Longformer, global tokens alone: an empty band); None
    for every other pattern. The kernels evaluate this predicate on the block map's partial
    tiles directly, from a per-position global flag, instead of reading bit tiles.

    Example:
        >>> from memattn import patterns
        >>> band_and_globals(patterns.longformer(8, [0]), 2)
        ([4, 4], [4, 4], (0,))
    """
    from ...patterns.global_tokens import GlobalTokens
    from ...patterns.longformer import Longformer

    if type(p) is Longformer:
        half = [w // 2 for w in _per_head(p.window, heads)]
        return half, half, tuple(p.global_indices)
    if type(p) is GlobalTokens:
        return [-1] * heads, [-1] * heads, tuple(p.indices)
    return None


def _global_flags(indices: tuple[int, ...], nq: int, nk: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """int32 flag over positions [pmin, nk) (1 = global), pmin = min(0, nk − nq)."""
    pmin = min(0, nk - nq)
    flags = torch.zeros(nk - pmin, dtype=torch.int32)
    idx = torch.tensor([i for i in indices if 0 <= i < nk], dtype=torch.int64)
    flags[idx - pmin] = 1
    return flags.to(device), pmin


def _batches(p: Pattern, batch: int) -> int:
    """How many batch entries the bit tiles need (1 unless a from_mask_mod pattern says
    its predicate depends on the batch index)."""
    if type(p) in (Intersection, Union):
        return max(_batches(p.a, batch), _batches(p.b, batch))
    return batch if getattr(p, "batch_size", 1) > 1 else 1


def _csr(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    if rows.numel():
        torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=ptr[1:])
    return ptr


def _map_cost(bm_obj, block: tuple[int, int]) -> float:
    full = int(bm_obj.full.sum())
    masked = bm_obj.nnz - full
    return (full + masked * (1 + _MASKED_EXTRA)) * block[0] * block[1] * _TILE_COST.get(block, 1.5)


def _choose_block(p: Pattern, nq: int, nk: int, blocks: tuple[tuple[int, int], ...]):
    """The candidate map block with the lowest estimated cost (later candidates are only
    built when the first one has many masked tiles)."""
    best = None
    for i, blk in enumerate(blocks):
        bmap = p.block_map(nq, nk, blk[0], blk[1])
        cost = _map_cost(bmap, blk)
        if best is None or cost < best[0]:
            best = (cost, blk, bmap)
        masked_frac = (bmap.nnz - int(bmap.full.sum())) / max(bmap.nnz, 1)
        if i == 0 and masked_frac < 0.3:
            break
    return best[1], best[2]


def _eval_tiles(p: Pattern, b: int, h: int, qb: torch.Tensor, kb: torch.Tensor, nq: int, nk: int, bm: int, bn: int,
                device: torch.device) -> torch.Tensor:
    """bool (T, bm, bn): the pattern on tiles (qb[t], kb[t]), False outside [0, nq) x [0, nk)."""
    ar_q = torch.arange(bm, dtype=torch.int64, device=device)
    ar_k = torch.arange(bn, dtype=torch.int64, device=device)
    qi = qb.to(device)[:, None] * bm + ar_q[None]
    ki = kb.to(device)[:, None] * bn + ar_k[None]
    vq, vk = qi < nq, ki < nk
    qpos = (torch.clamp(qi, max=nq - 1) + (nk - nq))[:, :, None]
    kpos = torch.clamp(ki, max=nk - 1)[:, None, :]
    m = p.mask(torch.tensor(b), torch.tensor(h), qpos, kpos)
    m = torch.broadcast_to(torch.as_tensor(m, device=device), (qb.numel(), bm, bn)).to(torch.bool)
    return m & vq[:, :, None] & vk[:, None, :]


def _pack(m: torch.Tensor) -> torch.Tensor:
    """bool (T, bm, bn) -> int32 (T, bm // 32, bn), bit r % 32 of word r // 32."""
    t, bm, bn = m.shape
    shifts = torch.arange(32, dtype=torch.int64, device=m.device).view(1, 1, 32, 1)
    words = (m.view(t, bm // 32, 32, bn).to(torch.int64) << shifts).sum(2)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)


def _build_bits(p: Pattern, heads: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor, nq: int, nk: int,
                block: tuple[int, int], batches: int, device: torch.device) -> tuple[torch.Tensor, str]:
    bm, bn = block
    n = qb.numel()
    out = torch.empty((batches, n, bm // 32, bn), dtype=torch.int32, device=device)
    if n == 0:
        return out, "none"
    per = max(1, _BITS_CHUNK // (bm * bn))
    where = device
    for b in range(batches):
        for c0 in range(0, n, per):
            c1 = min(n, c0 + per)
            hs = heads[c0:c1]
            for h in torch.unique(hs).tolist():
                sel = torch.nonzero(hs == h).flatten()
                try:
                    m = _eval_tiles(p, b, h, qb[c0:c1][sel], kb[c0:c1][sel], nq, nk, bm, bn, where)
                except (RuntimeError, TypeError):
                    if where.type == "cpu":
                        raise
                    # the pattern's predicate only runs on CPU tensors (its constants live there;
                    # a default-device context would leak device tensors into its caches)
                    where = torch.device("cpu")
                    m = _eval_tiles(p, b, h, qb[c0:c1][sel], kb[c0:c1][sel], nq, nk, bm, bn, where)
                out[b, c0 + sel.to(device)] = _pack(m).to(device)
    return out, where.type


def _map_spec(p: Pattern, nq: int, nk: int, heads: int, batch: int, device: torch.device,
              blocks: tuple[tuple[int, int], ...]) -> MaskSpec:
    t0 = time.perf_counter()
    p = p.for_sizes(nq, nk)
    block, bmap = _choose_block(p, nq, nk, blocks)
    bm, bn = block
    if bm % 32:
        raise ValueError(f"map block_q must be a multiple of 32, got {bm}")
    if bmap.num_heads not in (1, heads):
        raise ValueError(f"pattern varies over {bmap.num_heads} heads but q has {heads}")
    hm, qbn, kbn = bmap.num_heads, bmap.num_q_blocks, bmap.num_kv_blocks
    rows = torch.repeat_interleave(torch.arange(hm * qbn), bmap.row_ptr[1:] - bmap.row_ptr[:-1])
    head, qb = rows // qbn, rows % qbn
    kb = bmap.col.to(torch.int64)
    # A tile needs the masked path unless it is full and lies inside both bounds.
    edge = ((kb + 1) * bn > nk) | ((qb + 1) * bm > nq)
    masked = ~bmap.full | edge
    m_idx = torch.nonzero(masked).flatten()
    f_idx = torch.nonzero(~masked).flatten()
    t1 = time.perf_counter()
    pred = band_and_globals(p, hm)
    window = flags = None
    pmin = 0
    if pred is not None:      # the kernels evaluate the predicate: no bit tiles
        cap = nq + nk
        window = torch.tensor([[min(l_, cap), min(r, cap)] for l_, r in zip(pred[0], pred[1])],
                              dtype=torch.int32).to(device)
        flags, pmin = _global_flags(pred[2], nq, nk, device)
        bits, where = torch.empty((1, 0, bm // 32, bn), dtype=torch.int32, device=device), "predicate"
    else:
        bits, where = _build_bits(p, head[m_idx], qb[m_idx], kb[m_idx], nq, nk, block, _batches(p, batch), device)
    t2 = time.perf_counter()
    bit_id = torch.arange(m_idx.numel(), dtype=torch.int64)

    def lists(r: torch.Tensor, n_rows: int, c: torch.Tensor, order_key: torch.Tensor):
        # entries sorted by (row, col); returns CSR for masked and full lists
        out = []
        for idx, with_bits in ((m_idx, True), (f_idx, False)):
            key = order_key[idx]
            order = torch.argsort(key, stable=True)
            sel = idx[order]
            out.append(_csr(r[sel], n_rows).to(device))
            out.append(c[sel].to(torch.int32).to(device))
            if with_bits:
                out.append(bit_id[order].to(torch.int32).to(device))
        return tuple(out)

    fwd_rows = head * qbn + qb
    fwd = lists(fwd_rows, hm * qbn, kb, fwd_rows * kbn + kb)
    bwd_rows = head * kbn + kb
    bwd = lists(bwd_rows, hm * kbn, qb, bwd_rows * qbn + qb)
    t3 = time.perf_counter()
    info = {"path": "map", "tag": "map+pred" if pred is not None else "map", "map_block": block, "heads": hm, "tiles": bmap.nnz, "masked_tiles": int(m_idx.numel()),
            "bits_bytes": bits.numel() * 4, "bits_eval": where, "batches": bits.shape[0],
            "seconds": {"block_map": t1 - t0, "bits": t2 - t1, "lists": t3 - t2}}
    return MaskSpec("map", nq, nk, window=window, doc_id=flags, doc_pmin=pmin, map_block=block, map_heads=hm,
                    fwd=fwd, bwd=bwd, bits=bits, info=info)


def map_blocks_for(device: torch.device) -> tuple[tuple[int, int], ...]:
    """Block-map block sizes for problems on ``device`` (the CPU interpreter uses small ones
    so that tests see several tiles)."""
    if device.type == "cuda":
        return DEFAULT_MAP_BLOCKS
    return ((32, 32),)


# ----------------------------------------------------------------------------- entry point
_CACHE: "collections.OrderedDict[tuple, MaskSpec]" = collections.OrderedDict()
_CACHE_SIZE = 16


def describe(pattern: Pattern | None, nq: int, nk: int, heads: int, device: torch.device | str, *,
             batch: int = 1, force_map: bool = False,
             map_blocks: tuple[tuple[int, int], ...] | None = None) -> MaskSpec:
    """The kernel-facing description of ``pattern`` for an (nq, nk) problem (cached).

    Under ``torch.compile`` the description is computed outside the traced graph (its
    tensors enter the graph as constants), so block maps never cause a graph break.

    Args:
        pattern: a Pattern, or None for all pairs.
        nq, nk: query and key counts.
        heads: the number of query heads H (per-head patterns must have H heads).
        device: where the kernels run; every tensor of the result lives there.
        batch: the batch size B (bit tiles of batch-dependent ``from_mask_mod`` patterns).
        force_map: use the block map + bit tiles even for window/document patterns.
        map_blocks: candidate (block_q, block_k) sizes for the map path, first preferred
            (default :data:`DEFAULT_MAP_BLOCKS`); block_q must be a multiple of 32.
    Returns:
        a :class:`MaskSpec`.

    Example:
        >>> from memattn import patterns
        >>> describe(patterns.causal(), 4096, 4096, 8, "cpu").path
        'param'
        >>> spec = describe(patterns.bigbird(), 1024, 1024, 8, "cpu")
        >>> spec.path, spec.map_block
        ('map', (64, 64))
    """
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a memattn Pattern or None, got {type(pattern).__name__}")
    for name, v in (("nq", nq), ("nk", nk), ("heads", heads), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    blocks = tuple(tuple(b) for b in map_blocks) if map_blocks is not None else DEFAULT_MAP_BLOCKS
    if torch.compiler.is_compiling():
        # patterns built inside the traced code (e.g. ``p & causal()``) are passed by value
        key = _pattern_key(pattern)
        return _unflatten(_describe_constant(key, nq, nk, heads, batch, str(device), force_map, blocks))
    return _describe(pattern, nq, nk, heads, batch, str(device), force_map, blocks)


_KEY = "__memattn_pattern__"


def _pattern_key(p: Pattern | None):
    """A hashable by-value description of a (dataclass) pattern: (marker, class, field values)."""
    if p is None:
        return None
    vals = []
    for f in dataclasses.fields(p):
        x = getattr(p, f.name)
        vals.append(_pattern_key(x) if isinstance(x, Pattern) else x)
    return (_KEY, type(p), tuple(vals))


def _from_key(key) -> Pattern | None:
    if key is None:
        return None
    _, cls, vals = key
    return cls(*[_from_key(v) if isinstance(v, tuple) and len(v) == 3 and v[0] == _KEY else v for v in vals])


def _describe(pattern: Pattern | None, nq: int, nk: int, heads: int, batch: int, device: str, force_map: bool,
              blocks: tuple[tuple[int, int], ...]) -> MaskSpec:
    # No lock: a race only builds a description twice.
    key = (pattern, nq, nk, heads, batch, device, force_map, blocks)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    dev = torch.device(device)
    win = None if force_map else parametric_window(pattern)
    if win is not None:
        spec = _param_spec(win, nq, nk, heads, dev)
    else:
        spec = _map_spec(pattern if pattern is not None else Full(), nq, nk, heads, batch, dev, blocks)
    _CACHE[key] = spec
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return spec


@torch.compiler.assume_constant_result
def _describe_constant(key, nq: int, nk: int, heads: int, batch: int, device: str,
                       force_map: bool, blocks: tuple[tuple[int, int], ...]) -> tuple:
    """:func:`_describe` run eagerly while torch.compile traces (the result is a constant)."""
    return _flatten(_describe(_from_key(key), nq, nk, heads, batch, device, force_map, blocks))


def _flatten(s: MaskSpec) -> tuple:
    fwd = s.fwd if s.fwd is not None else (None,) * 5
    bwd = s.bwd if s.bwd is not None else (None,) * 5
    return (s.path, s.nq, s.nk, s.window, s.doc_id, s.doc_range, s.doc_pmin, s.map_block[0], s.map_block[1],
            s.map_heads, *fwd, *bwd, s.bits, s.info.get("tag", ""))


def _unflatten(t: tuple) -> MaskSpec:
    fwd, bwd = tuple(t[10:15]), tuple(t[15:20])
    return MaskSpec(t[0], t[1], t[2], window=t[3], doc_id=t[4], doc_range=t[5], doc_pmin=t[6],
                    map_block=(t[7], t[8]), map_heads=t[9], fwd=None if fwd[0] is None else fwd,
                    bwd=None if bwd[0] is None else bwd, bits=t[20], info={"tag": t[21]})


def clear_cache() -> None:
    """Forget cached descriptions (frees their device memory)."""
    _CACHE.clear()
