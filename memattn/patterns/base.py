"""The Pattern base class and its combinators.

A Pattern says which (query, key) pairs may attend, on *absolute positions*: query index
i sits at position ``i + nk - nq`` (bottom-right alignment, as flash_attn) and key index j
at position j. Every pattern provides

* ``mask(b, h, q_pos, kv_pos)``: the element predicate, vectorised and broadcasting;
* ``_coo(nq, nk, block_q, block_k)``: its block map, computed analytically (never from an
  (nq, nk) array), as a :class:`BlockCOO`.

From those two the base class derives ``dense``, ``block_map``, ``density`` and ``&``/``|``.
Patterns are frozen dataclasses: immutable and hashable, so maps can be cached by pattern.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from .blockmap import BlockCOO, BlockMap, _cdiv

__all__ = ["Pattern", "Intersection", "Union", "q_positions", "block_bounds"]

# Work budget (elements) for evaluating a predicate tile by tile.
_EVAL_CHUNK = 1 << 22


def q_positions(nq: int, nk: int) -> torch.Tensor:
    """Absolute positions of the nq queries: ``arange(nq) + nk - nq``."""
    return torch.arange(nq, dtype=torch.int64) + (nk - nq)


def block_bounds(n: int, block: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last absolute position (inclusive) of each of the ceil(n/block) blocks."""
    starts = torch.arange(_cdiv(n, block), dtype=torch.int64) * block
    ends = torch.clamp(starts + block, max=n) - 1
    return starts + offset, ends + offset


@dataclass(frozen=True)
class Pattern:
    """Base class of every attention pattern (immutable, hashable).

    Subclasses implement :meth:`mask` and, for an analytic block map, :meth:`_coo`.
    ``num_heads`` is None for a pattern that is the same for every head, else the head
    count it varies over (block maps then have Hm = num_heads).
    """

    num_heads: ClassVar[int | None] = None

    # ------------------------------------------------------------------ to override
    def mask(self, b: torch.Tensor | int, h: torch.Tensor | int, q_pos: torch.Tensor,
             kv_pos: torch.Tensor) -> torch.Tensor:
        """Element predicate on absolute positions (broadcasting); True = may attend."""
        raise NotImplementedError

    def _coo(self, nq: int, nk: int, block_q: int, block_k: int) -> BlockCOO:
        """Tiles with at least one allowed pair, and whether each is full.

        The default evaluates the predicate tile row by tile row (O(nq·nk) work, O(block_q·nk)
        memory): correct for any pattern, used where no analytic form exists."""
        return self._coo_by_evaluation(nq, nk, block_q, block_k)

    def for_sizes(self, nq: int, nk: int) -> "Pattern":
        """This pattern specialised to a problem of nq queries and nk keys.

        Most patterns do not depend on the sizes and return ``self``. Patterns whose rule
        needs them (``random``, ``bigbird``: their draws depend on nk) return a copy bound to
        nk, and patterns defined on a finite range (``document``, ``block_sparse``) raise a
        ValueError naming ``nq``/``nk`` when the problem does not fit. ``dense``,
        ``block_map`` and ``density`` call it; a backend evaluating ``mask`` itself must call
        ``pattern.for_sizes(nq, nk).mask(...)``.

        Example:
            >>> from memattn import patterns
            >>> p = patterns.causal()
            >>> p.for_sizes(4, 4) is p
            True
        """
        return self

    def kernel_spec(self, nq: int, nk: int) -> object | None:
        """Hook for kernels with a specialised path for this pattern (e.g. a window or
        document bounds computed in-kernel). None (the default): use the block map."""
        return None

    # Patterns that can intersect another pattern's tiles entry by entry, without building
    # their own map (windows, causal, documents), set this and implement the two below.
    # An intersection then builds only its most selective term and filters by the others,
    # so ``sliding_window(w) & causal()`` never builds causal's O((N/B)^2) map.
    _restrictable: ClassVar[bool] = False

    def _nnz_hint(self, nq: int, nk: int, block_q: int, block_k: int) -> int:
        """Number of tiles of this pattern's map, computed without building it."""
        raise NotImplementedError

    def _restrict(self, coo: BlockCOO, nq: int, nk: int, block_q: int, block_k: int) -> BlockCOO:
        """``coo`` intersected with this pattern's map (full = both full), entry by entry."""
        raise NotImplementedError

    # ------------------------------------------------------------------- derived
    @property
    def heads(self) -> int:
        return self.num_heads or 1

    def dense(self, nq: int, nk: int, *, head: int = 0, batch: int = 0) -> torch.Tensor:
        """bool (nq, nk): the pattern as a full matrix (small sizes: tests and pictures).

        Args:
            nq, nk: query and key counts (ints >= 1); query i sits at position i + nk - nq.
            head: the head to draw (per-head patterns: 0 <= head < num_heads; ignored otherwise).
            batch: the batch index passed to ``mask`` (matters for batch-dependent mask_mods).
        Returns:
            bool tensor (nq, nk), True where the pair may attend.

        Example:
            >>> from memattn import patterns
            >>> patterns.causal().dense(3, 3).int().tolist()
            [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
        """
        _check_sizes(nq, nk)
        if self.num_heads is not None and not 0 <= head < self.num_heads:
            raise ValueError(f"head={head} out of range for a pattern over {self.num_heads} heads")
        p = self.for_sizes(nq, nk)
        qp = q_positions(nq, nk)[:, None]
        kp = torch.arange(nk, dtype=torch.int64)[None, :]
        out = p.mask(torch.tensor(batch), torch.tensor(head), qp, kp)
        return torch.broadcast_to(out, (nq, nk)).to(torch.bool).clone()

    def block_map(self, nq: int, nk: int, block_q: int = 128, block_k: int = 128) -> BlockMap:
        """The tiles a kernel must visit, computed analytically; cached per arguments.

        Args:
            nq, nk: query and key counts (any values >= 1).
            block_q, block_k: tile sizes.
        Returns:
            BlockMap over Hm = ``num_heads or 1`` heads.

        Example:
            >>> from memattn import patterns
            >>> patterns.sliding_window(255).block_map(1024, 1024, 128, 128).kv_counts.tolist()
            [[1, 2, 3, 3, 3, 3, 3, 3]]
        """
        _check_sizes(nq, nk)
        for name, v in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        return _cached_block_map(self.for_sizes(nq, nk), nq, nk, block_q, block_k)

    def density(self, nq: int, nk: int) -> float:
        """Fraction of the nq·nk (query, key) pairs that are allowed (averaged over heads).

        Counted exactly: full tiles by their size, partial tiles by evaluating the predicate
        (in batches of tiles, never the whole (nq, nk) matrix).

        Example:
            >>> from memattn import patterns
            >>> patterns.sliding_window(1).density(4, 4)
            0.4375
        """
        _check_sizes(nq, nk)
        bq = bk = 128
        p = self.for_sizes(nq, nk)
        bm = p.block_map(nq, nk, bq, bk)
        qb_n = bm.num_q_blocks
        rows = torch.repeat_interleave(torch.arange(bm.num_heads * qb_n), bm.row_ptr[1:] - bm.row_ptr[:-1])
        head, qb = rows // qb_n, rows % qb_n
        kb = bm.col.to(torch.int64)
        qsize = torch.clamp(nq - qb * bq, max=bq)
        ksize = torch.clamp(nk - kb * bk, max=bk)
        allowed = int((qsize * ksize)[bm.full].sum())
        part = torch.nonzero(~bm.full).flatten()
        ar_q = torch.arange(bq, dtype=torch.int64)
        ar_k = torch.arange(bk, dtype=torch.int64)
        per_chunk = max(1, _EVAL_CHUNK // (bq * bk))
        for c in range(0, part.numel(), per_chunk):
            e = part[c:c + per_chunk]
            rq = qb[e, None] * bq + ar_q[None]               # [T, bq] query rows
            ck = kb[e, None] * bk + ar_k[None]               # [T, bk] key indices
            vq, vk = rq < nq, ck < nk
            qp = (torch.clamp(rq, max=nq - 1) + (nk - nq))[:, :, None]
            kp = torch.clamp(ck, max=nk - 1)[:, None, :]
            m = p.mask(torch.tensor(0), head[e, None, None], qp, kp)
            m = torch.broadcast_to(m, (e.numel(), bq, bk)) & vq[:, :, None] & vk[:, None, :]
            allowed += int(m.sum())
        return allowed / (nq * nk * bm.num_heads)

    def __and__(self, other: "Pattern") -> "Pattern":
        if not isinstance(other, Pattern):
            return NotImplemented
        return Intersection(self, other)

    def __or__(self, other: "Pattern") -> "Pattern":
        if not isinstance(other, Pattern):
            return NotImplemented
        return Union(self, other)

    # ------------------------------------------------------------------ helpers
    def _coo_by_evaluation(self, nq: int, nk: int, block_q: int, block_k: int, batches: int = 1) -> BlockCOO:
        """Block map by evaluating ``mask`` tile row by tile row, for every head and, when
        ``batches`` > 1, as the union over batch indices 0..batches-1 (a tile is listed if
        any batch allows a pair in it, full only if every batch allows all its pairs)."""
        p = self.for_sizes(nq, nk)
        qb_n, kb_n = _cdiv(nq, block_q), _cdiv(nk, block_k)
        heads = self.heads
        kp = torch.arange(nk, dtype=torch.int64)
        pad_k = kb_n * block_k - nk
        keys, fulls = [], []
        rows_per_chunk = max(1, _EVAL_CHUNK // max(1, block_q * nk))
        for h in range(heads):
            for q0 in range(0, qb_n, rows_per_chunk):
                q1 = min(qb_n, q0 + rows_per_chunk)
                i0, i1 = q0 * block_q, min(nq, q1 * block_q)
                qp = torch.arange(i0, i1, dtype=torch.int64) + (nk - nq)
                pad_q = (q1 - q0) * block_q - (i1 - i0)
                shape = (q1 - q0, block_q, kb_n, block_k)
                any_ = all_ = None
                for b in range(batches):
                    m = torch.broadcast_to(p.mask(torch.tensor(b), torch.tensor(h), qp[:, None], kp[None, :]),
                                           (i1 - i0, nk)).to(torch.bool)
                    # padding counts as allowed for "all", not allowed for "any"
                    m_any = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=False)
                    m_all = torch.nn.functional.pad(m, (0, pad_k, 0, pad_q), value=True)
                    a_b = m_any.reshape(shape).any(dim=3).any(dim=1)
                    f_b = m_all.reshape(shape).all(dim=3).all(dim=1)
                    any_ = a_b if any_ is None else any_ | a_b
                    all_ = f_b if all_ is None else all_ & f_b
                qi, ki = torch.nonzero(any_, as_tuple=True)
                keys.append(((h * qb_n + qi + q0) * kb_n + ki))
                fulls.append(all_[qi, ki])
        if not keys:
            return BlockCOO.empty(heads, qb_n, kb_n)
        return BlockCOO(heads, qb_n, kb_n, torch.cat(keys), torch.cat(fulls))


def _check_sizes(nq: int, nk: int) -> None:
    for name, v in (("nq", nq), ("nk", nk)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


@functools.lru_cache(maxsize=64)
def _cached_block_map(pattern: Pattern, nq: int, nk: int, block_q: int, block_k: int) -> BlockMap:
    coo = pattern._coo(nq, nk, block_q, block_k)
    return coo.to_block_map(nq, nk, block_q, block_k)


def _combined_heads(a: Pattern, b: Pattern) -> int | None:
    if a.num_heads and b.num_heads and a.num_heads != b.num_heads:
        raise ValueError(f"cannot combine patterns over {a.num_heads} and {b.num_heads} heads")
    return a.num_heads or b.num_heads


@dataclass(frozen=True)
class Intersection(Pattern):
    """Pairs allowed by both patterns (``a & b``)."""

    a: Pattern
    b: Pattern

    def __post_init__(self) -> None:
        _combined_heads(self.a, self.b)

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return _combined_heads(self.a, self.b)

    def for_sizes(self, nq: int, nk: int) -> Pattern:
        a, b = self.a.for_sizes(nq, nk), self.b.for_sizes(nq, nk)
        return self if (a is self.a and b is self.b) else Intersection(a, b)

    def mask(self, b, h, q_pos, kv_pos):
        return self.a.mask(b, h, q_pos, kv_pos) & self.b.mask(b, h, q_pos, kv_pos)

    def _terms(self) -> list[Pattern]:
        out: list[Pattern] = []
        for p in (self.a, self.b):
            out.extend(p._terms() if isinstance(p, Intersection) else [p])
        return out

    def _coo(self, nq, nk, block_q, block_k):
        # Build the terms that must be built; filter by the cheap ones (windows, documents),
        # starting from the most selective cheap one when every term is cheap.
        terms = self._terms()
        hard = [t for t in terms if not t._restrictable]
        soft = [t for t in terms if t._restrictable]
        if not hard:
            soft.sort(key=lambda t: t._nnz_hint(nq, nk, block_q, block_k))
            hard, soft = soft[:1], soft[1:]
        coo = hard[0]._coo(nq, nk, block_q, block_k)
        for t in hard[1:]:
            coo = coo.intersection(t._coo(nq, nk, block_q, block_k))
        for t in soft:
            coo = t._restrict(coo, nq, nk, block_q, block_k)
        return coo

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


@dataclass(frozen=True)
class Union(Pattern):
    """Pairs allowed by either pattern (``a | b``)."""

    a: Pattern
    b: Pattern

    def __post_init__(self) -> None:
        _combined_heads(self.a, self.b)

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return _combined_heads(self.a, self.b)

    def for_sizes(self, nq: int, nk: int) -> Pattern:
        a, b = self.a.for_sizes(nq, nk), self.b.for_sizes(nq, nk)
        return self if (a is self.a and b is self.b) else Union(a, b)

    def mask(self, b, h, q_pos, kv_pos):
        return self.a.mask(b, h, q_pos, kv_pos) | self.b.mask(b, h, q_pos, kv_pos)

    def _coo(self, nq, nk, block_q, block_k):
        return self.a._coo(nq, nk, block_q, block_k).union(self.b._coo(nq, nk, block_q, block_k))

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"
