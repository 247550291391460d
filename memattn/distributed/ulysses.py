"""Ulysses (DeepSpeed-Ulysses) attention: trade sequence shards for head shards.

Each rank holds a sequence shard of every head. One all-to-all gives each rank the whole
sequence for H/W of the heads; plain :func:`memattn.attention` runs there; a second
all-to-all brings the output back to sequence shards. It needs H and Hkv divisible by W.

What the backward needs (``keep_heads``):
- True (default, as DeepSpeed-Ulysses does): the all-to-alls and the local attention are
  separate autograd steps, so the attention keeps its head-sharded q, k, v and output
  (each the size of one sequence shard: (B, H/W, W·n, D) against (B, H, n, D)) and the
  backward moves only dout there and the three gradients back: four all-to-alls of
  n·H·D elements. The engine frees the head shards once the attention's backward is done,
  before the gradients travel. In a model, where q, k, v are intermediates nothing else
  keeps, this holds about the memory the shards would.
- False: the forward saves this rank's shards (q, k, v, out) and the backward regroups
  them again (eight all-to-alls) for :func:`memattn.api.attention_backward`. Leaner where
  the caller keeps q, k, v alive anyway (leaf tensors, or saved by another op), since then
  the head copies would be extra.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from torch.autograd.function import once_differentiable

from ..api import BACKENDS, attention, attention_backward, validate_inputs
from ..patterns import Pattern
from ._patterns import HeadSlice
from .sharding import (LAYOUTS, GroupInfo, _comm_device, check_consistent, dtype_code, float_bits, group_info,
                       text_hash)

__all__ = ["ulysses_attention"]


def _seq_to_heads(x: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """(B, H, n, D) sequence shard → (B, H/W, W·n, D): my head group, shards in rank order."""
    B, H, n, D = x.shape
    W = info.world
    send = x.reshape(B, W, H // W, n, D).transpose(0, 1).contiguous()  # [j] = head group j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=info.group)                # [j] = rank j's shard
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // W, W * n, D)


def _heads_to_seq(y: torch.Tensor, info: GroupInfo) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`: (B, H/W, W·n, D) → (B, H, n, D)."""
    B, h, N, D = y.shape
    W = info.world
    send = y.reshape(B, h, W, N // W, D).permute(2, 0, 1, 3, 4).contiguous()  # [j] = shard j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=info.group)                     # [j] = head group j
    return recv.transpose(0, 1).reshape(B, W * h, N // W, D)


def _to_global_order(x: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Rank-ordered shards along dim 2 → global sequence order (zigzag reorders)."""
    if layout == "contiguous":
        return x
    B, H, N, D = x.shape
    c = N // (2 * world)
    y = x.reshape(B, H, world, 2, c, D)  # [rank, which chunk]
    return torch.cat([y[:, :, :, 0], y[:, :, :, 1].flip(2)], dim=2).reshape(B, H, N, D)


def _from_global_order(x: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return x
    B, H, N, D = x.shape
    c = N // (2 * world)
    y = x.reshape(B, H, 2 * world, c, D)
    first, second = y[:, :, :world], y[:, :, world:].flip(2)
    return torch.stack([first, second], dim=3).reshape(B, H, N, D)


class _SeqToHeads(torch.autograd.Function):
    """Differentiable regrouping (B, H, n, D) sequence shard → (B, H/W, W·n, D) head shard in
    global order; its backward is the inverse all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, x, info, layout):  # type: ignore[override]
        ctx.cfg = (info, layout)
        return _to_global_order(_seq_to_heads(x, info), info.world, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        info, layout = ctx.cfg
        return _heads_to_seq(_from_global_order(g, info.world, layout), info), None, None


class _HeadsToSeq(torch.autograd.Function):
    """The inverse of :class:`_SeqToHeads`, differentiable the same way."""

    @staticmethod
    def forward(ctx, y, info, layout):  # type: ignore[override]
        ctx.cfg = (info, layout)
        return _heads_to_seq(_from_global_order(y, info.world, layout), info)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        info, layout = ctx.cfg
        return _to_global_order(_seq_to_heads(g, info), info.world, layout), None, None


def _ulysses_kept(q, k, v, info, layout, opts):
    """keep_heads=True: all-to-all, attention and all-to-all as three autograd steps. The
    attention saves its own (head-shard) inputs and output; the engine frees them after its
    backward, before the gradients' all-to-alls run."""
    qh, kh, vh = (_SeqToHeads.apply(t, info, layout) for t in (q, k, v))
    out_h, lse_h = attention(qh, kh, vh, return_lse=True, **opts)
    out = _HeadsToSeq.apply(out_h, info, layout)
    lse = _heads_to_seq(_from_global_order(lse_h.detach().unsqueeze(-1), info.world, layout), info).squeeze(-1)
    return out, lse


class _Ulysses(torch.autograd.Function):
    """keep_heads=False: all-to-all → local attention → all-to-all, saving only sequence shards
    for the backward, which regroups them again."""

    @staticmethod
    def forward(ctx, q, k, v, info, layout, opts):  # type: ignore[override]
        W = info.world
        qh, kh, vh = (_to_global_order(_seq_to_heads(t, info), W, layout) for t in (q, k, v))
        out_h, lse_h = attention(qh, kh, vh, return_lse=True, **opts)
        del qh, kh, vh
        out = _heads_to_seq(_from_global_order(out_h, W, layout), info)
        del out_h
        lse = _heads_to_seq(_from_global_order(lse_h.unsqueeze(-1), W, layout), info).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse_h)
        ctx.cfg = (info, layout, opts)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        q, k, v, out, lse_h = ctx.saved_tensors
        info, layout, opts = ctx.cfg
        W = info.world
        qh, kh, vh, oh, doh = (_to_global_order(_seq_to_heads(t, info), W, layout) for t in (q, k, v, out, dout))
        grads_h = attention_backward(qh, kh, vh, oh, doh, lse_h, **opts)
        del qh, kh, vh, oh, doh
        dq, dk, dv = (_heads_to_seq(_from_global_order(g, W, layout), info) for g in grads_h)
        return dq, dk, dv, None, None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Any = None,
                      layout: str = "contiguous", keep_heads: bool = True, **attention_kwargs: Any) -> Any:
    """Exact attention over a sequence sharded across ranks, by all-to-all over heads (Ulysses).

    Each rank passes its sequence shard of every head; an all-to-all
    (``torch.distributed.all_to_all_single``) regroups them into the whole sequence for
    H/W heads, :func:`memattn.attention` runs locally, and the inverse all-to-all returns
    the output rows of this rank's queries. Differentiable (the backward regroups again,
    runs the attention backward and sends the gradients back by the inverse all-to-all);
    every rank must run the backward too.

    Args:
        q: (B, Hq, n, D) this rank's queries; Hq divisible by the world size W.
        k: (B, Hkv, n, D) this rank's keys; Hkv divisible by W (GQA: Hq % Hkv == 0).
        v: (B, Hkv, n, Dv) this rank's values.
        group: the process group (None: default).
        layout: how the sequence was sharded, "contiguous" (default) or "zigzag"
            (see :func:`memattn.distributed.shard`); positions are global either way.
        keep_heads: save the head-sharded q, k, v and output for the backward (default;
            four all-to-alls there) instead of this rank's shards (eight); see the module
            docstring for the memory either way.
        **attention_kwargs: as in :func:`memattn.attention`: ``pattern``, ``causal``,
            ``scale``, ``softcap``, ``backend`` (which must provide ``attention_backward``
            for gradients), ``return_lse``. Patterns are on global positions; per-head
            patterns are sliced to each rank's heads. ``dropout_p`` > 0 is refused (its
            mask could not match a single-process run's; apply dropout outside).

    Returns:
        out (B, Hq, n, Dv) in q's dtype, or (out, lse) with lse float32 (B, Hq, n) when
        ``return_lse=True`` (no gradient flows through lse).

    Raises:
        ValueError: heads not divisible by W, bad arguments, or shapes/options that differ
            across ranks (checked on every rank before any data moves).
        RuntimeError: from torch.distributed when a rank dies or stalls (bounded by
            ``init_process_group(timeout=...)``).

    Example:
        >>> # after init_process_group; q_l, k_l, v_l = (shard(t, 2, "contiguous") for t in (q, k, v))
        >>> # out_l = ulysses_attention(q_l, k_l, v_l, causal=True)
    """
    allowed = {"pattern", "causal", "scale", "softcap", "dropout_p", "backend", "return_lse"}
    unknown = set(attention_kwargs) - allowed
    if unknown:
        raise TypeError(f"ulysses_attention got unexpected keyword arguments {sorted(unknown)}")
    pattern = attention_kwargs.get("pattern")
    causal = attention_kwargs.get("causal", False)
    scale = attention_kwargs.get("scale")
    softcap = attention_kwargs.get("softcap", 0.0)
    backend = attention_kwargs.get("backend", "auto")
    return_lse = attention_kwargs.get("return_lse", False)
    dropout_p = attention_kwargs.get("dropout_p", 0.0)
    scale = validate_inputs(q, k, v, scale=scale, softcap=softcap, dropout_p=dropout_p)
    if dropout_p:
        raise ValueError(f"dropout_p must be 0 for ulysses_attention (got {dropout_p!r}): apply dropout outside")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(keep_heads, bool):
        raise TypeError(f"keep_heads must be a bool, got {type(keep_heads).__name__}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"Ulysses attention is self-attention: q and k shards must have one length, "
                         f"got q {q.shape[2]} and k {k.shape[2]}")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a memattn.patterns.Pattern or None, got {type(pattern).__name__}")
    info = group_info(group)
    W, n = info.world, q.shape[2]
    if q.shape[1] % W:
        raise ValueError(f"q's head count {q.shape[1]} must be divisible by the world size {W} for Ulysses "
                         f"attention (use ring_attention otherwise)")
    if k.shape[1] % W:
        raise ValueError(f"k's head count {k.shape[1]} (kv heads) must be divisible by the world size {W} for "
                         f"Ulysses attention (use ring_attention otherwise)")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"q's shard length {n} must be even for the zigzag layout (two chunks per rank)")
    if pattern is not None and pattern.num_heads not in (None, q.shape[1]):
        raise ValueError(f"pattern varies over {pattern.num_heads} heads but q has {q.shape[1]}")
    check_consistent(info, _comm_device(q), {
        "B": q.shape[0], "Hq": q.shape[1], "Hkv": k.shape[1], "n_local": n, "D": q.shape[3], "Dv": v.shape[3],
        "dtype": dtype_code(q.dtype), "device_type": text_hash(q.device.type), "layout": LAYOUTS.index(layout),
        "causal": int(causal), "pattern": text_hash(repr(pattern)), "scale": float_bits(scale),
        "softcap": float_bits(softcap), "backend": text_hash(backend), "keep_heads": int(keep_heads)},
        "ulysses_attention")
    h = q.shape[1] // W
    if pattern is not None and pattern.num_heads is not None and W > 1:
        pattern = HeadSlice(pattern, info.rank * h, h)
    opts = {"pattern": pattern, "causal": causal, "scale": scale, "softcap": float(softcap), "backend": backend}
    if W == 1:
        return attention(q, k, v, return_lse=return_lse, **opts)
    if keep_heads:
        out, lse = _ulysses_kept(q, k, v, info, layout, opts)
    else:
        out, lse = _Ulysses.apply(q, k, v, info, layout, opts)
    return (out, lse) if return_lse else out
