"""memattn.nn.Attention: every mechanism with a padded batch (forward, backward, padding
invariance, training), wiring against float64 formulas, checkpointing, Performer redraws,
the KV cache, and input validation."""

from __future__ import annotations

import copy

import pytest
import torch

from memattn import patterns
from memattn.approx import linformer_attention
from memattn.mechanisms import catalog
from memattn.nn import Attention, KVCache

E, H, HKV, N = 32, 4, 2, 24

# (id, mechanism, options): every catalogue mechanism with small sizes, plus option variants
VARIANTS = (
    ("exact", "exact", {}),
    ("window", "window", dict(window=3)),
    ("dilated", "dilated", dict(window=6, dilation=2)),
    ("strided", "strided", dict(stride=5, window=2)),
    ("fixed", "fixed", dict(block_size=8, summary=2)),
    ("exponential", "exponential", dict(window=1)),
    ("random", "random", dict(keys_per_query=5)),
    ("longformer", "longformer", dict(window=4, global_tokens=(0, 5))),
    ("bigbird", "bigbird", dict(block_size=4, random_blocks=1)),
    ("linear_elu", "linear", {}),
    ("linear_relu", "linear", dict(feature_map="relu")),
    ("performer", "performer", dict(num_features=32)),
    ("performer_iid", "performer", dict(num_features=16, orthogonal=False)),
    ("linformer", "linformer", dict(rank=8, max_len=64)),
    ("linformer_per_head_shared_kv", "linformer", dict(rank=8, max_len=64, per_head=True, share_kv=True)),
    ("nystrom", "nystrom", dict(num_landmarks=5)),
    ("nystrom_conv", "nystrom", dict(num_landmarks=5, conv_kernel=3)),
    ("synth_dense", "synthesizer", dict(max_len=64)),
    ("synth_random_fixed", "synthesizer", dict(kind="random", learned=False, max_len=64)),
    ("synth_factorized_mix", "synthesizer", dict(kind="factorized", factors=4, mix=True, max_len=64)),
    ("pooled_avg", "pooled", dict(stride=3)),
    ("pooled_max", "pooled", dict(pool="max", stride=2)),
    ("pooled_conv", "pooled", dict(pool="conv", stride=3)),
    ("pooled_adaptive_funnel", "pooled", dict(pool="adaptive", target_len=5, pool_queries=True)),
)
IDS = [v[0] for v in VARIANTS]
CAUSAL = tuple((i, m, o) for i, m, o in VARIANTS
               if catalog()[m].causal and not o.get("pool_queries") and o.get("pool") != "adaptive")
# right padding leaves real outputs exactly as without the padding, except where the rule
# depends on the length: Nyström's segments, random/BigBird draws, adaptive pooling windows
TRUNCATION_INVARIANT = tuple(v for v in VARIANTS if v[1] not in ("nystrom", "random", "bigbird")
                             and v[2].get("pool") != "adaptive")
# causal mechanisms whose output at t does not depend on the length (random patterns draw per nk)
DECODABLE = tuple(v for v in CAUSAL if v[1] not in ("random", "bigbird"))


def test_variants_cover_the_catalogue():
    assert {m for _, m, _ in VARIANTS} == set(catalog())


@pytest.mark.parametrize("kind, mix, has_q, has_k", (("dense", False, True, False), ("random", False, False, False),
                                                    ("factorized", False, False, False), ("random", True, True, True)),
                         ids=("dense", "random", "factorized", "random_mix"))
def test_unread_projections_are_not_built(kind, mix, has_q, has_k):
    layer = Attention(E, H, mechanism="synthesizer", kind=kind, mix=mix, max_len=32)
    assert (layer.q_proj is not None) == has_q and (layer.k_proj is not None) == has_k


def make_layer(mech, opts, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Attention(E, H, num_kv_heads=HKV, mechanism=mech, **opts).to(dtype)


def batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N, E, generator=g, dtype=dtype)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, N - 6:] = False
    return x, mask


def _is_causal_variant(mech, opts):
    return any(m == mech and o == opts for _, m, o in CAUSAL)


# ------------------------------------------------------------------ every mechanism, padded batch
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("vid, mech, opts", VARIANTS, ids=IDS)
def test_forward_backward_padded_batch(vid, mech, opts, causal):
    if causal and not _is_causal_variant(mech, opts):
        layer = make_layer(mech, opts)
        x, mask = batch()
        with pytest.raises(ValueError, match="causal"):
            layer(x, attention_mask=mask, causal=True)
        return
    layer = make_layer(mech, opts)
    x, mask = batch()
    x.requires_grad_(True)
    out = layer(x, attention_mask=mask, causal=causal)
    assert out.shape == (2, N, E) and torch.isfinite(out).all()
    (out * mask[..., None]).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # padded tokens cannot change real outputs
    x2 = x.detach().clone()
    x2[1, N - 6:] = 10 * torch.randn(6, E, generator=torch.Generator().manual_seed(5))
    out2 = layer(x2, attention_mask=mask, causal=causal)
    assert torch.allclose(out2[mask], out.detach()[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("vid, mech, opts", TRUNCATION_INVARIANT, ids=[v[0] for v in TRUNCATION_INVARIANT])
def test_right_padding_equals_unpadded(vid, mech, opts, causal):
    if causal and not _is_causal_variant(mech, opts):
        return
    layer = make_layer(mech, opts).eval()
    x, mask = batch(1)
    out = layer(x, attention_mask=mask, causal=causal)
    short = layer(x[1:, : N - 6], causal=causal)
    assert torch.allclose(out[1, : N - 6], short[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vid, mech, opts", VARIANTS, ids=IDS)
def test_training_steps_lower_the_loss(vid, mech, opts):
    layer = make_layer(mech, opts, seed=1)
    x, mask = batch(2)
    target = torch.randn(2, N, E, generator=torch.Generator().manual_seed(3))
    causal = _is_causal_variant(mech, opts)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        out = layer(x, attention_mask=mask, causal=causal)
        loss = ((out - target) ** 2)[mask].mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------ wiring against float64 formulas
def projections64(layer, x):
    B, n, _ = x.shape
    d = layer.head_dim

    def proj(p, h):
        return None if p is None else p(x).view(B, n, h, d).transpose(1, 2)
    q, k, v = proj(layer.q_proj, layer.num_heads), proj(layer.k_proj, layer.num_kv_heads), proj(layer.v_proj,
                                                                                                  layer.num_kv_heads)
    g = layer.num_heads // layer.num_kv_heads
    return q, None if k is None else k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)


def finish(layer, o):
    B, h, n, d = o.shape
    return layer.out_proj(o.transpose(1, 2).reshape(B, n, h * d))


EXACT_VARIANTS = tuple(v for v in VARIANTS if catalog()[v[1]].exact)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("vid, mech, opts", EXACT_VARIANTS, ids=[v[0] for v in EXACT_VARIANTS])
def test_exact_layers_match_masked_softmax_float64(vid, mech, opts, causal):
    layer = make_layer(mech, opts, dtype=torch.float64)
    x, mask = batch(4, torch.float64)
    out = layer(x, attention_mask=mask, causal=causal)
    pattern = layer.core.pattern
    allowed = torch.ones(N, N, dtype=torch.bool) if pattern is None else pattern.dense(N, N)
    if causal:
        allowed = allowed & patterns.causal().dense(N, N)
    allowed = allowed[None, None] & mask[:, None, None, :]
    q, k, v = projections64(layer, x)
    s = (q @ k.transpose(-1, -2) / layer.head_dim ** 0.5).masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    ref = finish(layer, p @ v)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, extra", (("dense", {}), ("random", {}), ("factorized", dict(factors=3)),
                                         ("dense", dict(mix=True))),
                         ids=("dense", "random", "factorized", "dense_mix"))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_synthesizer_layer_matches_float64_formula(kind, extra, causal):
    layer = make_layer("synthesizer", dict(kind=kind, max_len=40, **extra), dtype=torch.float64)
    x, mask = batch(5, torch.float64)
    out = layer(x, attention_mask=mask, causal=causal)
    c = layer.core
    q, k, v = projections64(layer, x)
    if kind == "dense":
        s = torch.relu(q @ c.w1 + c.b1) @ c.w2[..., :N] + c.b2[..., :N]
    elif kind == "random":
        s = c.r[None, :, :N, :N]
    else:
        s = (c.r1[:, :N] @ c.r2[:, :N].transpose(-1, -2))[None]
    if extra.get("mix"):
        w = torch.softmax(c.mix_logits, -1)
        s = w[:, 0, None, None] * s + w[:, 1, None, None] * (q @ k.transpose(-1, -2)) / layer.head_dim ** 0.5
    allowed = mask[:, None, None, :] & (torch.tril(torch.ones(N, N, dtype=torch.bool)) if causal else True)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    assert torch.allclose(out, finish(layer, p @ v), rtol=1e-10, atol=1e-12)


def test_nystrom_conv_residual_layer_matches_formula():
    layer = make_layer("nystrom", dict(num_landmarks=N, pinv_iterations=60, conv_kernel=5), dtype=torch.float64)
    x, _ = batch(6, torch.float64)
    out = layer(x)
    q, k, v = projections64(layer, x)
    exact = torch.softmax(q @ k.transpose(-1, -2) / layer.head_dim ** 0.5, -1) @ v   # all tokens landmarks: exact
    w = layer.core.conv.weight[:, 0, :, 0]                                            # (H, kernel)
    vp = torch.nn.functional.pad(v, (0, 0, 2, 2))
    conv = sum(w[None, :, j, None, None] * vp[:, :, j:j + N] for j in range(5))
    assert torch.allclose(out, finish(layer, exact + conv), rtol=1e-8, atol=1e-10)


def test_linformer_layer_uses_the_first_n_columns():
    layer = make_layer("linformer", dict(rank=6, max_len=50), dtype=torch.float64)
    x, _ = batch(7, torch.float64)
    q, k, v = projections64(layer, x)
    g = layer.num_heads // layer.num_kv_heads
    c = layer.core
    ref = linformer_attention(q, k[:, ::g], v[:, ::g], proj_k=c.proj_k[:, :N], proj_v=c.proj_v[:, :N])
    assert torch.allclose(layer(x), finish(layer, ref), rtol=1e-10)
    with pytest.raises(ValueError, match="max_len=50"):
        layer(torch.randn(1, 51, E, dtype=torch.float64))


# ------------------------------------------------------------------ checkpointing
@pytest.mark.parametrize("mech, opts", (("exact", {}), ("window", dict(window=3)), ("performer", dict(num_features=16)),
                                        ("linformer", dict(rank=8, max_len=64)), ("pooled", dict(pool="conv"))),
                         ids=("exact", "window", "performer", "linformer", "pooled_conv"))
def test_checkpoint_gives_identical_results(mech, opts):
    a = make_layer(mech, opts)
    b = copy.deepcopy(a)
    b.checkpoint = True
    x, mask = batch(8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    causal = catalog()[mech].causal
    oa = a(xa, attention_mask=mask, causal=causal)
    ob = b(xb, attention_mask=mask, causal=causal)
    assert torch.equal(oa, ob)
    oa.sum().backward()
    ob.sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-6, atol=1e-7), n


def test_checkpoint_with_attention_dropout_replays_the_same_mask():
    a = Attention(E, H, mechanism="exact", dropout=0.3, checkpoint=True)
    x = torch.randn(2, N, E, requires_grad=True)
    torch.manual_seed(11)
    out = a(x)
    out.sum().backward()
    g_ckpt = x.grad.clone()
    a.checkpoint = False
    x.grad = None
    torch.manual_seed(11)
    out2 = a(x)
    out2.sum().backward()
    assert torch.equal(out, out2)
    assert torch.allclose(g_ckpt, x.grad, rtol=1e-6, atol=1e-7)


def test_checkpoint_keeps_fewer_activations():
    """The approximate mechanisms' intermediates are not saved under checkpoint=True."""
    def saved_bytes(layer):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        x = torch.randn(1, 256, E, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return total
    plain = Attention(E, H, mechanism="nystrom", num_landmarks=16)
    ck = copy.deepcopy(plain)
    ck.checkpoint = True
    assert saved_bytes(ck) < saved_bytes(plain) / 2


# ------------------------------------------------------------------ performer redraws
def test_performer_redraw_schedule():
    layer = Attention(E, H, mechanism="performer", num_features=16, redraw_interval=3)
    x = torch.randn(1, 8, E)
    seen = [layer.core.projection.clone()]
    for _ in range(7):
        layer(x)
        seen.append(layer.core.projection.clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    # forwards 1-3 use the first draw; forward 4 redraws, 7 redraws again
    assert changed == [False, False, False, True, False, False, True]
    layer.eval()
    before = layer.core.projection.clone()
    for _ in range(5):
        layer(x)
    assert torch.equal(before, layer.core.projection)
    never = Attention(E, H, mechanism="performer", num_features=16, redraw_interval=0)
    p0 = never.core.projection.clone()
    for _ in range(5):
        never(x)
    assert torch.equal(p0, never.core.projection)


def test_performer_seed_reproducible_and_in_state_dict():
    a = Attention(E, H, mechanism="performer", num_features=16, seed=3)
    b = Attention(E, H, mechanism="performer", num_features=16, seed=3)
    c = Attention(E, H, mechanism="performer", num_features=16, seed=4)
    assert torch.equal(a.core.projection, b.core.projection)
    assert not torch.equal(a.core.projection, c.core.projection)
    assert "core.projection" in a.state_dict()


# ------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("preallocate", (True, False), ids=("prealloc", "growing"))
@pytest.mark.parametrize("vid, mech, opts", DECODABLE, ids=[v[0] for v in DECODABLE])
def test_incremental_decode_equals_full_causal_forward(vid, mech, opts, preallocate):
    layer = make_layer(mech, opts).eval()
    x, _ = batch(9)
    with torch.no_grad():
        full = layer(x, causal=True)
        cache = KVCache(max_len=N if preallocate else None)
        outs = [layer(x[:, :7], causal=True, kv_cache=cache)]
        for t in range(7, N):
            outs.append(layer(x[:, t:t + 1], causal=True, kv_cache=cache))
    assert len(cache) == N
    assert torch.allclose(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_decode_with_left_padding_mask():
    layer = make_layer("exact", {}).eval()
    x, _ = batch(10)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, :4] = False                                  # left padding, as in batched generation
    with torch.no_grad():
        full = layer(x, attention_mask=mask, causal=True)
        cache = KVCache(max_len=N)
        outs = [layer(x[:, :10], attention_mask=mask[:, :10], causal=True, kv_cache=cache)]
        for t in range(10, N):
            outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], causal=True, kv_cache=cache))
    got = torch.cat(outs, 1)
    assert torch.allclose(got[mask], full[mask], rtol=1e-4, atol=1e-5)


def test_kv_cache_unit_behaviour():
    c = KVCache(max_len=4)
    k = torch.randn(1, 2, 3, 5)
    ka, va = c.update(k, k + 1)
    assert torch.equal(ka, k) and torch.equal(va, k + 1) and c.length == 3
    with pytest.raises(ValueError, match="overflow"):
        c.update(torch.randn(1, 2, 2, 5), torch.randn(1, 2, 2, 5))
    with pytest.raises(ValueError, match="cache holds"):
        c.update(torch.randn(1, 3, 1, 5), torch.randn(1, 3, 1, 5))
    c.reset()
    assert len(c) == 0
    g = KVCache()
    g.update(k, k)
    kk, _ = g.update(k, k)
    assert kk.shape == (1, 2, 6, 5)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(max_len=0)


def test_cache_rejected_for_non_cache_options():
    layer = make_layer("nystrom", dict(num_landmarks=4, conv_kernel=3))
    cache = KVCache()
    layer(torch.randn(1, 6, E), kv_cache=cache)
    with pytest.raises(ValueError, match="queries as keys"):
        layer(torch.randn(1, 1, E), kv_cache=cache)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, exc, match",
    (
        (dict(mechanism="flash"), ValueError, "mechanism"),
        (dict(mechanism="window", rank=3), ValueError, "unknown option"),
        (dict(mechanism="window", window=-1), ValueError, "window"),
        (dict(mechanism="window", window=2.5), TypeError, "window"),
        (dict(mechanism="linear", feature_map="tanh"), ValueError, "feature_map"),
        (dict(mechanism="synthesizer", kind="mlp"), ValueError, "kind"),
        (dict(mechanism="pooled", pool="median"), ValueError, "pool"),
        (dict(mechanism="performer", num_features=0), ValueError, "num_features"),
        (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(checkpoint="yes"), TypeError, "checkpoint"),
        (dict(mechanism="exact", backend="gpu"), ValueError, "backend"),
    ),
    ids=("mechanism", "unknown_option", "negative", "float_window", "feature_map", "kind", "pool",
         "num_features", "kv_heads", "dropout", "checkpoint", "backend"),
)
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Attention(E, H, **kwargs)


def test_embed_dim_must_divide():
    with pytest.raises(ValueError, match="multiple"):
        Attention(30, 4)


@pytest.mark.parametrize("mech", ("linformer", "nystrom"))
def test_causal_rejected_where_unsupported(mech):
    with pytest.raises(ValueError, match="no causal form"):
        Attention(E, H, mechanism=mech)(torch.randn(1, 8, E), causal=True)


def test_forward_validation():
    layer = Attention(E, H)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(1, 8, E + 1))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(1, 8, E), attention_mask=torch.ones(1, 7))
    with pytest.raises(TypeError, match="kv_cache"):
        layer(torch.randn(1, 8, E), kv_cache={})
    with pytest.raises(TypeError, match="causal"):
        layer(torch.randn(1, 8, E), causal=1)
