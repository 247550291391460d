"""Sequence sharding for ring and Ulysses attention: layouts, shard/unshard, group checks.

A global sequence of N positions is cut into equal chunks:

* ``"contiguous"``: W chunks, rank r holds chunk r (positions [r·N/W, (r+1)·N/W)).
* ``"zigzag"``: 2W chunks, rank r holds chunks r and 2W−1−r, in that order. Under a causal
  mask every rank then owns one early and one late chunk, so every rank does the same work.

Within a shard, positions increase with the local index in both layouts.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LAYOUTS", "layout_chunks", "shard_positions", "shard", "unshard", "GroupInfo", "group_info",
           "check_consistent"]

LAYOUTS = ("zigzag", "contiguous")
_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def layout_chunks(layout: str, rank: int, world: int) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in local order (out of W or 2W chunks).

    Example:
        >>> layout_chunks("zigzag", 1, 4)
        (1, 6)
        >>> layout_chunks("contiguous", 1, 4)
        (1,)
    """
    _check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def _chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def shard_positions(n_local: int, layout: str, rank: int, world: int) -> torch.Tensor:
    """Global positions (int64, (n_local,)) of a rank's shard, e.g. for rotary embeddings.

    Args:
        n_local: shard length (even for zigzag).
        layout: "zigzag" or "contiguous".
        rank, world: the rank within its group and the group size.
    Returns:
        int64 tensor (n_local,), ascending.

    Example:
        >>> shard_positions(4, "zigzag", 0, 2).tolist()
        [0, 1, 6, 7]
    """
    per = _chunks_per_rank(_check_layout(layout))
    if not isinstance(n_local, int) or n_local < 1 or n_local % per:
        raise ValueError(f"n_local must be a positive int divisible by {per} for layout {layout!r}, got {n_local!r}")
    c = n_local // per
    return torch.cat([torch.arange(ci * c, (ci + 1) * c, dtype=torch.int64)
                      for ci in layout_chunks(layout, rank, world)])


# ----------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class GroupInfo:
    """This process's place in a process group."""

    group: Any  # torch.distributed.ProcessGroup or None (the default group)
    rank: int
    world: int

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of a member of this group (P2P peers are named by it)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


def group_info(group: Any = None) -> GroupInfo:
    """Rank and size of ``group`` (None: the default group); raises if not initialised.

    Example:
        >>> # after torch.distributed.init_process_group("gloo", ...)
        >>> # info = group_info(); info.rank, info.world
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "(e.g. under torchrun) before using memattn.distributed")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return GroupInfo(group, rank, dist.get_world_size(group))


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo takes CPU ones.
    return t.device if t.is_cuda else torch.device("cpu")


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else -1


def float_bits(x: float | None) -> int:
    """An exact int64 image of a float (for cross-rank comparison); None → -1."""
    if x is None:
        return -1
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def text_hash(s: str) -> int:
    """A process-independent hash of a string (Python's hash() is salted per process)."""
    return zlib.crc32(s.encode())


def check_consistent(info: GroupInfo, device: torch.device, fields: dict[str, int], what: str) -> None:
    """All-gather ``fields`` and raise ValueError on every rank if any rank differs.

    The collective waits at most the group's timeout, set by
    ``torch.distributed.init_process_group(timeout=...)``: a dead or absent rank ends in
    an error there, not a hang.
    """
    if info.world == 1:
        return
    vals = torch.tensor(list(fields.values()), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(vals) for _ in range(info.world)]
    dist.all_gather(gathered, vals, group=info.group)
    table = torch.stack(gathered).cpu()
    bad = [f"{name} (per rank: {table[:, i].tolist()})" for i, name in enumerate(fields)
           if bool((table[:, i] != table[0, i]).any())]
    if bad:
        raise ValueError(f"{what}: ranks disagree on " + "; ".join(bad))


# ----------------------------------------------------------------------------- shard / unshard
def _check_dim(x: torch.Tensor, dim: Any) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    return dim % x.dim()


def shard(x: torch.Tensor, dim: int, layout: str = "zigzag", group: Any = None) -> torch.Tensor:
    """This rank's part of a full-sequence tensor (the same full tensor on every rank).

    Args:
        x: the whole tensor; ``x.shape[dim]`` must divide into 2W (zigzag) or W (contiguous) chunks.
        dim: the sequence dimension (2 for (B, H, N, D)).
        layout: "zigzag" (chunks r and 2W−1−r, concatenated) or "contiguous" (chunk r).
        group: the process group (None: default).
    Returns:
        (..., N / W, ...) tensor; a view for contiguous, a copy for zigzag. Differentiable.

    Example:
        >>> # rank 0 of 2, zigzag: positions [0..N/4) and [3N/4..N)
        >>> # q_local = shard(q, 2, "zigzag")
    """
    dim = _check_dim(x, dim)
    _check_layout(layout)
    info = group_info(group)
    per = _chunks_per_rank(layout)
    n = x.shape[dim]
    if n % (per * info.world):
        raise ValueError(f"x.shape[{dim}] = {n} must be divisible by {per * info.world} "
                         f"({per} chunk(s) per rank × {info.world} ranks) for layout {layout!r}")
    c = n // (per * info.world)
    parts = [x.narrow(dim, ci * c, c) for ci in layout_chunks(layout, info.rank, info.world)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _reorder_gathered(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Concatenate per-rank shards into global order."""
    if layout == "contiguous":
        return torch.cat(parts, dim)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, layout: str, info: GroupInfo) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.layout, ctx.info = dim, layout, info
        xc = x.contiguous()
        parts = [torch.empty_like(xc) for _ in range(info.world)]
        dist.all_gather(parts, xc, group=info.group)
        return _reorder_gathered(parts, dim, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Each rank's loss may use the whole tensor: sum over ranks, keep this rank's part.
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=ctx.info.group)
        per = _chunks_per_rank(ctx.layout)
        c = g.shape[ctx.dim] // (per * ctx.info.world)
        parts = [g.narrow(ctx.dim, ci * c, c) for ci in layout_chunks(ctx.layout, ctx.info.rank, ctx.info.world)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, ctx.dim)), None, None, None


def unshard(x: torch.Tensor, dim: int, layout: str = "zigzag", group: Any = None) -> torch.Tensor:
    """Gather every rank's shard and put the sequence back in global order (inverse of :func:`shard`).

    Shard shapes are checked across ranks first (an error, never a hang, within the
    group's timeout). Differentiable: the backward sums the incoming gradients over ranks
    (all_reduce) and returns this rank's part, i.e. the gradient of the *sum* of every
    rank's loss, as ``torch.distributed.nn.functional.all_gather`` does.

    Args:
        x: this rank's shard, ``x.shape[dim]`` even for zigzag.
        dim: the sequence dimension.
        layout: "zigzag" or "contiguous" (as used to shard).
        group: the process group (None: default).
    Returns:
        the whole tensor, ``x.shape[dim] · W`` long in ``dim``, on every rank.

    Example:
        >>> # full = unshard(out_local, 2, "zigzag")   # (B, H, N, D) on every rank
    """
    dim = _check_dim(x, dim)
    _check_layout(layout)
    info = group_info(group)
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"x.shape[{dim}] = {x.shape[dim]} must be even for the zigzag layout (two chunks)")
    if x.dim() > 8:
        raise ValueError(f"x must have at most 8 dimensions, got {x.dim()}")
    fields = {"x.dim()": x.dim(), "x.dtype": dtype_code(x.dtype)}
    fields.update({f"x.shape[{i}]": (x.shape[i] if i < x.dim() else -1) for i in range(8)})
    check_consistent(info, _comm_device(x), fields, "unshard")
    if info.world == 1:
        return x
    return _Unshard.apply(x, dim, layout, info)
