"""BlockMap: which (query block, key block) tiles a kernel visits, and which are full.

A block map is stored compactly, row by row (CSR): for every (head, query block) row, the
sorted key blocks it must visit and a flag saying whether every pair in that tile is
allowed ("full": the kernel skips the predicate there). Rows of very different length
(a global query block attends to every key block, its neighbours to ten) cost only what
they hold; the padded views of the contract (``kv_indices``, ``kv_full``) are built on
first use.

Shapes (Hm = 1 for head-independent patterns, or the number of heads):
    row_ptr   int64 (Hm * QB + 1,)    CSR offsets, row r = h * QB + q_block
    col       int32 (nnz,)            key block of each entry, ascending within a row
    full      bool  (nnz,)            every pair of the tile is allowed
    kv_counts int32 (Hm, QB)
    kv_indices int32 (Hm, QB, max_kv) padded with 0 beyond kv_counts (built lazily)
    kv_full    bool  (Hm, QB, max_kv) padded with False (built lazily)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["BlockMap", "BlockCOO"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockCOO:
    """Sorted, duplicate-free list of tiles used while building a map.

    ``key = (h * QB + q_block) * KB + kv_block`` (int64, ascending, unique), ``full`` bool.
    Combinators (union, intersection, broadcast over heads) work on this form.
    """

    heads: int
    num_q_blocks: int
    num_kv_blocks: int
    key: torch.Tensor
    full: torch.Tensor

    # ------------------------------------------------------------------ builders
    @staticmethod
    def empty(heads: int, qb: int, kb: int) -> "BlockCOO":
        return BlockCOO(heads, qb, kb, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.bool))

    @staticmethod
    def from_entries(heads: int, qb: int, kb: int, head: torch.Tensor, q_block: torch.Tensor,
                     kv_block: torch.Tensor, full: torch.Tensor) -> "BlockCOO":
        """Entries in any order, duplicates allowed (a duplicate is full if any copy is)."""
        head = head.to(torch.int64)
        q_block = q_block.to(torch.int64)
        kv_block = kv_block.to(torch.int64)
        key = (head * qb + q_block) * kb + kv_block
        return BlockCOO._normalise(heads, qb, kb, key, full.to(torch.bool))

    @staticmethod
    def from_ranges(heads: int, qb: int, kb: int, lo: torch.Tensor, hi: torch.Tensor,
                    full_lo: torch.Tensor | None = None, full_hi: torch.Tensor | None = None) -> "BlockCOO":
        """Each row r (shape (heads, QB) or (QB,)) visits kv blocks [lo, hi); those in
        [full_lo, full_hi) are full. Empty ranges (hi <= lo) are allowed."""
        lo = torch.as_tensor(lo, dtype=torch.int64).clamp(0, kb)
        hi = torch.as_tensor(hi, dtype=torch.int64).clamp(0, kb)
        if lo.dim() == 1:
            lo, hi = lo.expand(heads, qb), hi.expand(heads, qb)
        hi = torch.maximum(hi, lo)
        counts = (hi - lo).reshape(-1)
        rows = torch.arange(heads * qb, dtype=torch.int64)
        row_of = torch.repeat_interleave(rows, counts)
        starts = torch.cumsum(counts, 0) - counts
        offs = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(starts, counts)
        kv = torch.repeat_interleave(lo.reshape(-1), counts) + offs
        if full_lo is None:
            full = torch.zeros_like(kv, dtype=torch.bool)
        else:
            flo = torch.as_tensor(full_lo, dtype=torch.int64)
            fhi = torch.as_tensor(full_hi, dtype=torch.int64)
            if flo.dim() == 1:
                flo, fhi = flo.expand(heads, qb), fhi.expand(heads, qb)
            flo_e = torch.repeat_interleave(flo.reshape(-1), counts)
            fhi_e = torch.repeat_interleave(fhi.reshape(-1), counts)
            full = (kv >= flo_e) & (kv < fhi_e)
        key = row_of * kb + kv  # rows are (h * QB + q), already sorted and unique
        return BlockCOO(heads, qb, kb, key, full)

    @staticmethod
    def _normalise(heads: int, qb: int, kb: int, key: torch.Tensor, full: torch.Tensor) -> "BlockCOO":
        if key.numel() == 0:
            return BlockCOO.empty(heads, qb, kb)
        key, order = torch.sort(key, stable=True)
        full = full[order]
        uniq, inverse = torch.unique_consecutive(key, return_inverse=True)
        if uniq.numel() != key.numel():
            f = torch.zeros(uniq.numel(), dtype=torch.bool)
            f.index_put_((inverse,), full, accumulate=True)
            full = f
        return BlockCOO(heads, qb, kb, uniq, full)

    # --------------------------------------------------------------- combinators
    def select(self, keep: torch.Tensor, full: torch.Tensor | None = None) -> "BlockCOO":
        """The entries where ``keep`` (bool, one per entry) is True; ``full`` (one per entry,
        optional) replaces the full flags before selection. Order and uniqueness are kept."""
        f = self.full if full is None else full.to(torch.bool)
        return BlockCOO(self.heads, self.num_q_blocks, self.num_kv_blocks, self.key[keep], f[keep])

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(head, q_block, kv_block) int64 of every entry, in key order."""
        row = self.key // self.num_kv_blocks
        return row // self.num_q_blocks, row % self.num_q_blocks, self.key % self.num_kv_blocks

    def broadcast_heads(self, heads: int) -> "BlockCOO":
        if self.heads == heads:
            return self
        if self.heads != 1:
            raise ValueError(f"cannot combine a pattern over {self.heads} heads with one over {heads} heads")
        per_head = self.num_q_blocks * self.num_kv_blocks
        key = (torch.arange(heads, dtype=torch.int64)[:, None] * per_head + self.key[None, :]).reshape(-1)
        return BlockCOO(heads, self.num_q_blocks, self.num_kv_blocks, key, self.full.repeat(heads))

    def union(self, other: "BlockCOO") -> "BlockCOO":
        h = max(self.heads, other.heads)
        a, b = self.broadcast_heads(h), other.broadcast_heads(h)
        return BlockCOO._normalise(h, self.num_q_blocks, self.num_kv_blocks,
                                   torch.cat([a.key, b.key]), torch.cat([a.full, b.full]))

    def intersection(self, other: "BlockCOO") -> "BlockCOO":
        h = max(self.heads, other.heads)
        a, b = self.broadcast_heads(h), other.broadcast_heads(h)
        if a.key.numel() == 0 or b.key.numel() == 0:
            return BlockCOO.empty(h, self.num_q_blocks, self.num_kv_blocks)
        pos = torch.searchsorted(b.key, a.key).clamp(max=b.key.numel() - 1)
        hit = b.key[pos] == a.key
        return BlockCOO(h, self.num_q_blocks, self.num_kv_blocks, a.key[hit], a.full[hit] & b.full[pos[hit]])

    def to_block_map(self, nq: int, nk: int, block_q: int, block_k: int) -> "BlockMap":
        rows = self.key // self.num_kv_blocks
        counts = torch.bincount(rows, minlength=self.heads * self.num_q_blocks)
        row_ptr = torch.zeros(self.heads * self.num_q_blocks + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        col = (self.key % self.num_kv_blocks).to(torch.int32)
        return BlockMap(nq=nq, nk=nk, block_q=block_q, block_k=block_k, num_heads=self.heads,
                        row_ptr=row_ptr, col=col, full=self.full.clone())


@dataclass(frozen=True, eq=False)
class BlockMap:
    """The tiles a kernel visits for one (nq, nk, block_q, block_k) problem.

    Example:
        >>> import memattn
        >>> bm = memattn.patterns.causal().block_map(300, 300, 128, 128)
        >>> bm.kv_counts.tolist()
        [[1, 2, 3]]
        >>> [(q, k, f) for q, k, f in bm.blocks()][:3]
        [(0, 0, False), (1, 0, True), (1, 1, False)]
    """

    nq: int
    nk: int
    block_q: int
    block_k: int
    num_heads: int
    row_ptr: torch.Tensor
    col: torch.Tensor
    full: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.nq, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.nk, self.block_k)

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @property
    def kv_counts(self) -> torch.Tensor:
        """int32 (Hm, QB): how many key blocks each query block visits."""
        return (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int32).reshape(self.num_heads, self.num_q_blocks)

    @property
    def max_kv(self) -> int:
        return int(self.kv_counts.max()) if self.kv_counts.numel() else 0

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "padded" not in self._cache:
            rows = self.num_heads * self.num_q_blocks
            width = max(self.max_kv, 1)
            counts = (self.row_ptr[1:] - self.row_ptr[:-1])
            row_of = torch.repeat_interleave(torch.arange(rows), counts)
            slot = torch.arange(self.nnz) - self.row_ptr[:-1][row_of]
            idx = torch.zeros(rows, width, dtype=torch.int32)
            ful = torch.zeros(rows, width, dtype=torch.bool)
            idx[row_of, slot] = self.col
            ful[row_of, slot] = self.full
            shape = (self.num_heads, self.num_q_blocks, width)
            self._cache["padded"] = (idx.reshape(shape), ful.reshape(shape))
        return self._cache["padded"]

    @property
    def kv_indices(self) -> torch.Tensor:
        """int32 (Hm, QB, max_kv): key blocks of each query block, ascending, 0-padded."""
        return self._padded()[0]

    @property
    def kv_full(self) -> torch.Tensor:
        """bool (Hm, QB, max_kv): the tile needs no predicate; False in the padding."""
        return self._padded()[1]

    def blocks(self, head: int = 0) -> Iterator[tuple[int, int, bool]]:
        """Yield (q_block, kv_block, full) for one head, in q_block then kv_block order."""
        h = head if self.num_heads > 1 else 0
        if not 0 <= h < self.num_heads:
            raise ValueError(f"head={head} out of range for a map over {self.num_heads} heads")
        ptr = self.row_ptr.tolist()
        col = self.col.tolist()
        full = self.full.tolist()
        for qb in range(self.num_q_blocks):
            r = h * self.num_q_blocks + qb
            for e in range(ptr[r], ptr[r + 1]):
                yield qb, col[e], full[e]

    def transposed(self) -> "BlockMap":
        """The same tiles listed per key block (rows = key blocks, columns = query blocks),
        as the dK/dV pass of a backward visits them. block_q/block_k and nq/nk swap."""
        if "t" not in self._cache:
            qb, kb = self.num_q_blocks, self.num_kv_blocks
            rows = torch.repeat_interleave(torch.arange(self.num_heads * qb), self.row_ptr[1:] - self.row_ptr[:-1])
            head, q = rows // qb, rows % qb
            coo = BlockCOO.from_entries(self.num_heads, kb, qb, head, self.col.to(torch.int64), q, self.full)
            self._cache["t"] = coo.to_block_map(self.nk, self.nq, self.block_k, self.block_q)
        return self._cache["t"]

    def nbytes(self) -> int:
        """Bytes held by the compact form (row_ptr, col, full)."""
        return sum(t.numel() * t.element_size() for t in (self.row_ptr, self.col, self.full))

    def to(self, device: torch.device | str) -> "BlockMap":
        """A copy whose index tensors live on ``device`` (for GPU kernels)."""
        return BlockMap(self.nq, self.nk, self.block_q, self.block_k, self.num_heads,
                        self.row_ptr.to(device), self.col.to(device), self.full.to(device))

    def __repr__(self) -> str:
        return (f"BlockMap(nq={self.nq}, nk={self.nk}, block=({self.block_q}, {self.block_k}), "
                f"heads={self.num_heads}, tiles={self.nnz}, full={int(self.full.sum())})")
