"""Small models trained per mechanism on MQAR and ListOps (accuracy per mechanism).

The model is a pre-norm Transformer: token + learned position embeddings, ``layers`` blocks
of :class:`memattn.nn.Attention` (``mechanism=name``) and a GELU MLP, a final LayerNorm and
a linear head. MQAR reads the head at every position (next-token prediction, scored at
query positions); ListOps mean-pools the real tokens into 10 classes. Every catalogue
mechanism gets the same model, data, optimiser and step budget; only the attention differs.
Options that set how much a sparse or low-rank mechanism sees are scaled to the task's
length (:func:`task_options`), so that "window" is not secretly full attention.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tasks import IGNORE, ListOpsBatch, MQARBatch, LISTOPS_VOCAB, listops_dataset, mqar

__all__ = ["TaskModel", "MQARConfig", "ListOpsConfig", "task_options", "train_mqar", "train_listops", "listops_data",
           "mechanism_names"]


def mechanism_names() -> list[str]:
    """Every mechanism of :func:`memattn.mechanisms.catalog` (each gets its row)."""
    from ..mechanisms import catalog

    return list(catalog())


def task_options(mechanism: str, seq_len: int) -> dict[str, Any]:
    """Options giving a mechanism about seq_len/8 keys per query (sparse) or rank (low-rank).

    Args:
        mechanism: a catalogue name.
        seq_len: the task's longest sequence.
    Returns:
        keyword options for :class:`memattn.nn.Attention`.

    Example:
        >>> task_options("window", 256)
        {'window': 32}
    """
    r = max(4, seq_len // 8)
    blk = max(4, seq_len // 16)
    opts: dict[str, dict[str, Any]] = {
        "window": {"window": r},
        "dilated": {"window": 2 * r, "dilation": 2},
        "strided": {"stride": max(2, int(math.isqrt(seq_len))), "window": max(2, int(math.isqrt(seq_len)))},
        "fixed": {"block_size": 2 * blk, "summary": max(1, blk // 4)},
        "exponential": {"window": 4},
        "random": {"keys_per_query": r},
        "longformer": {"window": r},
        "bigbird": {"block_size": blk, "window_blocks": 3, "global_blocks": 2, "random_blocks": 2},
        "performer": {"num_features": 64},
        "linformer": {"rank": r, "max_len": seq_len},
        "nystrom": {"num_landmarks": max(4, seq_len // 16)},
        "synthesizer": {"max_len": seq_len},
        "pooled": {"stride": 4},
    }
    return dict(opts.get(mechanism, {}))


class _Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, mechanism: str, options: dict, shift: bool) -> None:
        super().__init__()
        from ..nn import Attention

        # token shift x_t + W x_{t-1}: the short causal convolution of H3 / Based (Zoology)
        self.shift = nn.Linear(d_model, d_model, bias=False) if shift else None
        if self.shift is not None:
            nn.init.zeros_(self.shift.weight)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, mechanism=mechanism, **options)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        if self.shift is not None:
            x = x + self.shift(F.pad(x, (0, 0, 1, 0))[:, :-1])
        x = x + self.attn(self.norm1(x), attention_mask=mask, causal=causal)
        return x + self.mlp(self.norm2(x))


class TaskModel(nn.Module):
    """Embeddings → ``layers`` × (Attention(mechanism) + MLP) → LayerNorm → head.

    Args:
        vocab_size: input tokens.
        num_outputs: head width (vocabulary for MQAR, 10 classes for ListOps).
        d_model, layers, num_heads: the model's size.
        mechanism: a catalogue name; options: its options.
        max_len: positions of the learned position embedding.
        pool: mean-pool real tokens before the head (classification).
        shift: start every block with a token shift ``x_t + W x_{t-1}`` (W starts at 0), the
            short convolution that H3/Based-style models (and Zoology's) put before the mixer.

    Example:
        >>> m = TaskModel(32, 32, d_model=32, layers=1, num_heads=2, mechanism="exact", max_len=16)
        >>> m(torch.zeros(2, 16, dtype=torch.long), causal=True).shape
        torch.Size([2, 16, 32])
    """

    def __init__(self, vocab_size: int, num_outputs: int, *, d_model: int, layers: int, num_heads: int,
                 mechanism: str, max_len: int, options: dict | None = None, pool: bool = False,
                 shift: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, num_heads, mechanism, dict(options or {}), shift)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)
        self.pool = pool
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids: torch.Tensor, *, padding_mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """ids (B, N) → logits (B, N, outputs), or (B, outputs) when pooling."""
        n = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))[None]
        for blk in self.blocks:
            x = blk(x, padding_mask, causal)
        x = self.norm(x)
        if self.pool:
            if padding_mask is None:
                x = x.mean(1)
            else:
                w = padding_mask.to(x.dtype)[..., None]
                x = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.head(x)


@dataclass
class _TrainCfg:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    warmup: float = 0.1
    d_model: int = 64
    layers: int = 2
    num_heads: int = 2
    seed: int = 0
    shift: bool = True


@dataclass
class MQARConfig(_TrainCfg):
    """MQAR task and training budget (defaults: the acceptance setting)."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    seq_len: int = 256
    num_pairs: int = 16
    vocab_size: int = 256
    test_examples: int = 512


@dataclass
class ListOpsConfig(_TrainCfg):
    """ListOps (shortened) task and training budget."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    min_len: int = 32
    max_len: int = 256
    train_examples: int = 2000
    test_examples: int = 400
    d_model: int = 64
    layers: int = 2
    num_heads: int = 2


def _lr_at(step: int, total: int, base: float, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return base * (step + 1) / w
    t = (step - w) / max(1, total - w)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def _optimiser(model: nn.Module, cfg: _TrainCfg) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos" not in n and "tok" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos" not in n and "tok" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def _causal_for(mechanism: str) -> bool:
    from ..mechanisms import catalog

    return bool(catalog()[mechanism].causal)


def train_mqar(mechanism: str, cfg: MQARConfig, *, device: str = "cpu",
               progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train a small model with ``mechanism`` on MQAR; accuracy on held-out examples.

    Causal mechanisms run causally (a language model); the others see the whole sequence,
    which the task allows (no answer follows its query, see :mod:`memattn.eval.tasks`).

    Args:
        mechanism: a catalogue name.
        cfg: task and budget.
        device: "cpu" or "cuda".
        progress: called as progress(step, loss) after every step.
    Returns:
        dict with accuracy (query positions of the test set), loss, steps, seconds, causal,
        options, parameters.
    """
    torch.manual_seed(cfg.seed)
    causal = _causal_for(mechanism)
    opts = task_options(mechanism, cfg.seq_len)
    model = TaskModel(cfg.vocab_size, cfg.vocab_size, d_model=cfg.d_model, layers=cfg.layers,
                      num_heads=cfg.num_heads, mechanism=mechanism, max_len=cfg.seq_len, options=opts,
                      shift=cfg.shift).to(device)
    opt = _optimiser(model, cfg)
    t0 = time.perf_counter()
    loss_v = float("nan")
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        b = mqar(cfg.batch_size, seq_len=cfg.seq_len, num_pairs=cfg.num_pairs, vocab_size=cfg.vocab_size,
                 seed=cfg.seed * 1_000_003 + step + 1)
        x, y = b.inputs.to(device), b.targets.to(device)
        logits = model(x, causal=causal)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v = float(loss.detach())
        if progress is not None:
            progress(step, loss_v)
    seconds = time.perf_counter() - t0
    test = mqar(cfg.test_examples, seq_len=cfg.seq_len, num_pairs=cfg.num_pairs, vocab_size=cfg.vocab_size,
                seed=10**9 + cfg.seed)
    acc = _mqar_accuracy(model, test, causal, device, cfg.batch_size)
    return {"accuracy": acc, "loss": loss_v, "steps": cfg.steps, "seconds": seconds, "causal": causal,
            "options": opts, "parameters": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def _mqar_accuracy(model: TaskModel, data: MQARBatch, causal: bool, device: str, batch: int) -> float:
    model.eval()
    hit = total = 0
    for i in range(0, data.inputs.shape[0], batch):
        x = data.inputs[i:i + batch].to(device)
        y = data.targets[i:i + batch].to(device)
        pred = model(x, causal=causal).argmax(-1)
        scored = y != IGNORE
        hit += int((pred[scored] == y[scored]).sum())
        total += int(scored.sum())
    return hit / max(1, total)


def listops_data(cfg: ListOpsConfig) -> tuple[ListOpsBatch, ListOpsBatch]:
    """(train, test) sets of the shortened ListOps, a function of ``cfg`` (shared by mechanisms)."""
    train = listops_dataset(cfg.train_examples, min_len=cfg.min_len, max_len=cfg.max_len, seed=cfg.seed + 1)
    test = listops_dataset(cfg.test_examples, min_len=cfg.min_len, max_len=cfg.max_len, seed=cfg.seed + 10**6)
    return train, test


def _batch(data: ListOpsBatch, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = int(data.lengths[idx].max())
    x = data.inputs[idx, :n]
    mask = torch.arange(n)[None, :] < data.lengths[idx][:, None]
    return x, mask, data.labels[idx]


def train_listops(mechanism: str, cfg: ListOpsConfig, data: tuple[ListOpsBatch, ListOpsBatch], *,
                  device: str = "cpu", progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train a small classifier with ``mechanism`` on ListOps (bidirectional, padded batches).

    Args:
        mechanism: a catalogue name.
        cfg: task and budget.
        data: (train, test) from :func:`listops_data`.
        device: "cpu" or "cuda".
        progress: called as progress(step, loss) after every step.
    Returns:
        dict with accuracy (test set), loss, steps, seconds, options, parameters.
    """
    torch.manual_seed(cfg.seed)
    train, test = data
    opts = task_options(mechanism, cfg.max_len)
    model = TaskModel(len(LISTOPS_VOCAB), 10, d_model=cfg.d_model, layers=cfg.layers, num_heads=cfg.num_heads,
                      mechanism=mechanism, max_len=cfg.max_len, options=opts, pool=True,
                      shift=cfg.shift).to(device)
    opt = _optimiser(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    loss_v = float("nan")
    model.train()
    n = train.inputs.shape[0]
    for step in range(cfg.steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x, mask, y = (t.to(device) for t in _batch(train, idx))
        loss = F.cross_entropy(model(x, padding_mask=mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v = float(loss.detach())
        if progress is not None:
            progress(step, loss_v)
    seconds = time.perf_counter() - t0
    model.eval()
    hit = 0
    with torch.no_grad():
        for i in range(0, test.inputs.shape[0], cfg.batch_size):
            idx = torch.arange(i, min(i + cfg.batch_size, test.inputs.shape[0]))
            x, mask, y = (t.to(device) for t in _batch(test, idx))
            hit += int((model(x, padding_mask=mask).argmax(-1) == y).sum())
    majority = int(torch.bincount(test.labels, minlength=10).max()) / test.labels.numel()
    return {"accuracy": hit / test.inputs.shape[0], "majority": majority, "loss": loss_v, "steps": cfg.steps,
            "seconds": seconds, "options": opts, "parameters": sum(p.numel() for p in model.parameters())}
