"""memattn.eval.dropin / approx_error / variants on small random transformers models (no
downloads): capture, per-variant attention, errors, perplexity, embeddings, memory."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (eval extra)")

from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from memattn.eval import approx_error, dropin  # noqa: E402
from memattn.eval.variants import DROPIN, by_name  # noqa: E402

hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _ids(n, b=1, seed=0):
    return torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def test_capture_layers_keeps_inputs_and_restores_the_model(llama):
    llama.set_attn_implementation("sdpa")
    caps = dropin.capture_layers(llama, {"input_ids": _ids(80)})
    assert [c.layer for c in caps] == [0, 1]
    assert caps[0].q.shape == (1, 4, 80, 16) and caps[0].k.shape == (1, 2, 80, 16)
    assert caps[0].mask.kind == "causal" and caps[0].shape.kv_heads == 2
    assert llama.config._attn_implementation == "sdpa"
    only = dropin.capture_layers(llama, {"input_ids": _ids(8)}, layers=[1])
    assert [c.layer for c in only] == [1]


def test_exact_and_sdpa_rows_have_rounding_error_only(llama):
    caps = dropin.capture_layers(llama, {"input_ids": _ids(100)})
    errs = approx_error.layer_errors(by_name(["SDPA", "exact", "window 64", "Nyström 64"]), caps, True)
    assert all(e < 1e-5 for e in errs["SDPA"] + errs["exact"])
    assert all(e > 1e-3 for e in errs["window 64"])  # 100 tokens: the window drops keys
    assert errs["Nyström 64"] == [None, None]  # not causal: no row for a decoder


def test_errors_with_padding_count_real_rows_only(bert):
    batch = {"input_ids": _ids(30, 2), "attention_mask": torch.tensor([[1] * 30, [1] * 12 + [0] * 18])}
    caps = dropin.capture_layers(bert, batch)
    assert caps[0].mask.kind == "bidirectional" and caps[0].mask.key_valid is not None
    errs = approx_error.layer_errors(by_name(["SDPA", "exact", "linear elu"]), caps, False)
    assert max(errs["SDPA"] + errs["exact"]) < 1e-5 and min(errs["linear elu"]) > 1e-3


def test_relative_error_definition():
    ref = torch.ones(1, 1, 4, 2)
    out = ref.clone()
    out[0, 0, 3] = 5.0  # a padded row: ignored when rows says so
    rows = torch.tensor([[True, True, True, False]])
    assert approx_error.relative_error(out, ref, rows) == 0.0
    assert math.isclose(approx_error.relative_error(out, ref), math.sqrt(32) / math.sqrt(8))


def test_perplexity_hand_mask_and_greedy_tokens(llama):
    ids = _ids(100, 2, seed=3)
    sdpa = dropin.perplexity(llama, ids, "sdpa")
    exact = dropin.perplexity(llama, ids, by_name(["exact"])[0].register(True))
    assert sdpa["tokens"] == 2 * 99 and abs(exact["ppl"] - sdpa["ppl"]) / sdpa["ppl"] < 1e-5
    sinks = dropin.perplexity(llama, ids, by_name(["window 64 + 4 sinks"])[0].register(True))
    hand = dropin.hand_mask_perplexity(llama, ids, 64, 4)
    assert abs(sinks["ppl"] - hand["ppl"]) / hand["ppl"] < 1e-5
    assert abs(sinks["ppl"] - sdpa["ppl"]) > 1e-6  # the window does cut keys at 100 tokens
    a = dropin.greedy_tokens(llama, ids[:1, :20], "sdpa", 10)
    b = dropin.greedy_tokens(llama, ids[:1, :20], by_name(["exact"])[0].register(True), 10)
    assert a == b and len(a) == 10


def test_sentence_embeddings_padded_batch_exact_equals_sdpa(bert):
    batch = {"input_ids": _ids(20, 3, seed=4), "attention_mask": torch.tensor([[1] * 20, [1] * 9 + [0] * 11,
                                                                               [1] * 3 + [0] * 17]),
             "token_type_ids": torch.zeros(3, 20, dtype=torch.int64)}
    ref = dropin.sentence_embeddings(bert, batch, "sdpa")
    got = dropin.sentence_embeddings(bert, batch, by_name(["exact"])[0].register(False))
    torch.testing.assert_close(ref.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    assert float((ref * got).sum(-1).min()) > 1 - 1e-9


@pytest.mark.parametrize("variant", [v.name for v in DROPIN])
def test_every_variant_runs_on_captured_inputs_with_memory(bert, llama, variant):
    var = by_name([variant])[0]
    caps = dropin.capture_layers(bert, {"input_ids": _ids(70)}, layers=[0])
    out = dropin.run_attention(var, caps[0], False)
    assert out.shape == caps[0].q.shape and torch.isfinite(out).all()
    assert dropin.attention_memory(var, caps[0], False, "cpu") >= 0
    if var.supports(True):
        c = dropin.capture_layers(llama, {"input_ids": _ids(70)}, layers=[0])[0]
        assert torch.isfinite(dropin.run_attention(var, c, True)).all()
