"""Drop-in quality on real pretrained models, without fine-tuning.

* SmolLM2-135M (a decoder): perplexity on a Shakespeare play, sequences of 2048 tokens.
* all-MiniLM-L6-v2 (an encoder): cosine between each variant's sentence embedding (mean of
  the last hidden states over real tokens, L2-normalised) and the exact model's, on a
  padded batch of passages of several lengths.
* Memory beside quality: the measured peak memory of one attention call on a captured
  layer's inputs (:class:`memattn.bench.memory.Meter`), and for the decoder the state a
  variant must keep per layer to generate the next token (:meth:`Variant.decode_state`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .variants import LayerShape, Variant

__all__ = ["perplexity", "sentence_embeddings", "Capture", "capture_layers", "attention_memory", "smollm2_ids",
           "minilm_batch", "greedy_tokens", "hand_mask_perplexity"]

CAPTURE_NAME = "memattn-eval-capture"


def smollm2_ids(tokenizer, play: str, seq_len: int, num_seqs: int) -> torch.Tensor:
    """(num_seqs, seq_len) consecutive token windows of a play (from its first act)."""
    from .data import shakespeare_text

    ids = tokenizer(shakespeare_text(play), return_tensors="pt").input_ids[0]
    need = seq_len * num_seqs
    if ids.numel() < need:
        raise ValueError(f"{play} has {ids.numel()} tokens, fewer than {num_seqs} x {seq_len}")
    return ids[:need].view(num_seqs, seq_len)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, impl: str, *, device: str = "cpu", attention_mask: torch.Tensor | None = None,
               progress: Callable[[], None] | None = None) -> dict[str, float]:
    """Perplexity of a causal LM with ``attn_implementation=impl`` over rows of ``ids``.

    Args:
        model: a transformers causal LM.
        ids: int64 (S, T); every row is one sequence (T − 1 predicted tokens each).
        impl: the attention implementation ("sdpa" or a registered name).
        attention_mask: optional 4-D mask passed as is (a hand-written mask).
    Returns:
        {"ppl", "nll" (mean), "tokens", "seconds"}.
    """
    model.set_attn_implementation(impl)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for row in ids:
        x = row[None].to(device)
        kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
        out = model(x, labels=x, **kw)
        n = x.shape[1] - 1
        total += float(out.loss) * n
        count += n
        if progress is not None:
            progress()
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def hand_mask_perplexity(model, ids: torch.Tensor, window: int, sinks: int, *, device: str = "cpu") -> dict[str, float]:
    """SDPA perplexity with a causal window-plus-sinks mask written by hand as a 4-D bool tensor."""
    n = ids.shape[1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sinks))
    return perplexity(model, ids, "sdpa", device=device, attention_mask=allowed[None, None])


@torch.no_grad()
def greedy_tokens(model, prompt: torch.Tensor, impl: str, new_tokens: int, *, device: str = "cpu") -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt`` (1, T), decoding with the KV cache."""
    model.set_attn_implementation(impl)
    x = prompt.to(device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, x.shape[1]:].tolist()


def minilm_batch(tokenizer, play: str, lengths: Iterable[int]) -> dict[str, torch.Tensor]:
    """A padded batch of consecutive passages of a play with these token lengths (<= 512)."""
    from .data import shakespeare_text

    ids = tokenizer(shakespeare_text(play), add_special_tokens=False)["input_ids"]
    rows, pos = [], 0
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for n in lengths:
        if not 3 <= n <= 512:
            raise ValueError(f"passage lengths must be in 3..512, got {n}")
        body = ids[pos:pos + n - 2]
        pos += n - 2
        rows.append([cls] + body + [sep])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for r, row in enumerate(rows):
        input_ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids)}


@torch.no_grad()
def sentence_embeddings(model, batch: dict[str, torch.Tensor], impl: str, *, device: str = "cpu") -> torch.Tensor:
    """(B, E) float64 L2-normalised mean of the last hidden states over real tokens."""
    model.set_attn_implementation(impl)
    enc = {k: v.to(device) for k, v in batch.items()}
    h = model(**enc).last_hidden_state.double()
    w = enc["attention_mask"][..., None].to(h.dtype)
    e = (h * w).sum(1) / w.sum(1)
    return torch.nn.functional.normalize(e, dim=-1).cpu()


# ----------------------------------------------------------------------------------------------
# Captured attention inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Capture:
    """One layer's attention call: module, q (B, Hq, N, D), k, v (B, Hkv, N, D), mask, scale."""

    layer: int
    module: Any
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Any
    scaling: float | None

    @property
    def shape(self) -> LayerShape:
        return LayerShape(self.q.shape[1], self.k.shape[1], self.q.shape[3], self.v.shape[3])


def capture_layers(model, inputs: dict[str, torch.Tensor], layers: Iterable[int] | None = None) -> list[Capture]:
    """Run the model once with memattn exact attention, keeping the q, k, v of chosen layers.

    Args:
        model: a transformers model (its layers' attention modules carry ``layer_idx``, else
            layers are numbered in call order).
        inputs: the model's keyword inputs.
        layers: layer indices to keep (None: all).
    Returns:
        Captures in layer order (tensors detached).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ..integrations.transformers import mask_forward, register, registered, unregister

    keep = None if layers is None else set(layers)
    exact_name = "memattn-eval-capture-exact"
    if exact_name not in registered():
        register(exact_name)
    exact_fn = AttentionInterface._global_mapping[exact_name]
    found: list[Capture] = []
    counter = [0]

    def capture_fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        idx = getattr(module, "layer_idx", None)
        idx = counter[0] if idx is None else int(idx)
        counter[0] += 1
        if keep is None or idx in keep:
            found.append(Capture(idx, module, query.detach(), key.detach(), value.detach(), attention_mask, scaling))
        return exact_fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kw)

    AttentionInterface.register(CAPTURE_NAME, capture_fn)
    AttentionMaskInterface.register(CAPTURE_NAME, mask_forward)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(CAPTURE_NAME)
        with torch.no_grad():
            model(**inputs)
    finally:
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop(CAPTURE_NAME, None)
        AttentionMaskInterface._global_mapping.pop(CAPTURE_NAME, None)
        if exact_name in registered():
            unregister(exact_name)
    return sorted(found, key=lambda c: c.layer)


def attention_fn(variant: Variant, causal: bool) -> Callable:
    """The attention function a variant installs in transformers (SDPA's for the peer)."""
    from transformers import AttentionInterface

    name = variant.register(causal)
    return AttentionInterface._global_mapping[name]


def run_attention(variant: Variant, cap: Capture, causal: bool) -> torch.Tensor:
    """One attention call of ``variant`` on captured inputs → (B, Hq, N, Dv)."""
    fn = attention_fn(variant, causal)
    mask = cap.mask
    if variant.kind == "sdpa":
        mask = None if mask is None or mask.key_valid is None else _sdpa_mask(mask)
    out, _ = fn(cap.module, cap.q, cap.k, cap.v, mask, dropout=0.0, scaling=cap.scaling,
                is_causal=causal if mask is None else None)
    return out.transpose(1, 2)


def _sdpa_mask(mask) -> torch.Tensor:
    """The bool (B, 1, Nq, Nk) mask SDPA needs for a MemattnMask with padding."""
    nq, nk = mask.q_length, mask.kv_length
    m = mask.key_valid[:, None, None, :].expand(-1, 1, nq, nk)
    if mask.kind == "causal":
        m = m & torch.ones(nq, nk, dtype=torch.bool, device=m.device).tril(nk - nq)
    return m


def attention_memory(variant: Variant, cap: Capture, causal: bool, device: str) -> int:
    """Peak bytes of one attention call of ``variant`` on captured inputs (beyond the inputs).

    CUDA: ``max_memory_allocated`` after a reset; CPU: the process's resident high-water mark
    after ``malloc_trim`` (see :mod:`memattn.bench.memory`). A warm-up call runs first.
    """
    from ..bench.memory import Meter

    run_attention(variant, cap, causal)  # warm-up: block maps, projections, code paths
    meter = Meter("cuda" if device.startswith("cuda") else "cpu")
    base = meter.start()
    out = run_attention(variant, cap, causal)
    peak = meter.peak()
    del out
    return max(0, int(peak - base))
