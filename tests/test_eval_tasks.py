"""Task generators of memattn.eval: MQAR and ListOps, checked against their definitions."""

from __future__ import annotations

import random

import pytest
import torch

from memattn.eval.report import pareto_front
from memattn.eval.tasks import (IGNORE, LISTOPS_VOCAB, listops_dataset, listops_evaluate, listops_expression,
                                listops_tokens, mqar)

MQAR_CASES = (
    pytest.param(dict(seq_len=64, num_pairs=4, vocab_size=32), id="L64-D4-V32"),
    pytest.param(dict(seq_len=256, num_pairs=16, vocab_size=8192), id="L256-D16-V8192"),
    pytest.param(dict(seq_len=100, num_pairs=25, vocab_size=64), id="L100-D25-V64-tight"),
)


@pytest.mark.parametrize("kw", MQAR_CASES)
def test_mqar_keys_lower_half_values_upper_half(kw):
    b = mqar(16, seed=3, **kw)
    D, V = kw["num_pairs"], kw["vocab_size"]
    keys, values = b.inputs[:, 0:2 * D:2], b.inputs[:, 1:2 * D:2]
    assert bool(((keys >= 1) & (keys < V // 2)).all())
    assert bool(((values >= V // 2) & (values < V)).all())
    for row in keys:  # distinct keys, so every query has one answer
        assert row.unique().numel() == D
    assert bool((b.targets[:, :2 * D] == IGNORE).all())  # nothing scored inside the pairs


@pytest.mark.parametrize("kw", MQAR_CASES)
def test_mqar_queries_are_present_keys_with_their_values(kw):
    b = mqar(16, seed=5, **kw)
    D = kw["num_pairs"]
    for x, y in zip(b.inputs, b.targets):
        table = {int(x[2 * i]): int(x[2 * i + 1]) for i in range(D)}
        pos = torch.nonzero(y != IGNORE).flatten().tolist()
        assert len(pos) == D
        queried = [int(x[p]) for p in pos]
        assert sorted(queried) == sorted(table)  # every key queried exactly once
        for p in pos:
            assert int(y[p]) == table[int(x[p])]
            assert p >= 2 * D and (p - 2 * D) % 2 == 0
            assert int(x[p + 1]) == 0  # the answer never follows its query (filler)
        others = [int(x[p]) for p in range(2 * D, len(x)) if p not in pos]
        assert set(others) <= {0}


def test_mqar_query_positions_skew_early():
    # p(slot i) ∝ i^(a-1) with a = 0.01: the first slots are far more likely than the last.
    b = mqar(400, seq_len=256, num_pairs=16, vocab_size=256, seed=0)
    pos = torch.nonzero(b.targets != IGNORE)[:, 1]
    slots = (pos - 32) // 2
    first, last = int((slots < 16).sum()), int((slots >= 96).sum())
    assert first > 3 * last


def test_mqar_is_deterministic_in_seed():
    a, b, c = mqar(4, seed=1), mqar(4, seed=1), mqar(4, seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("kw, match", (
    pytest.param(dict(vocab_size=33), "vocab_size", id="odd-vocab"),
    pytest.param(dict(vocab_size=16, num_pairs=16), "vocab_size", id="vocab-too-small"),
    pytest.param(dict(seq_len=40, num_pairs=16), "seq_len", id="too-short"),
    pytest.param(dict(alpha=0.0), "alpha", id="alpha-zero"),
    pytest.param(dict(num_pairs=0), "num_pairs", id="no-pairs"),
))
def test_mqar_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        mqar(2, **kw)


LISTOPS_HAND = (
    pytest.param("[MAX 2 9 [MIN 4 7 ] 0 ]", 9, id="max-min"),
    pytest.param("[MIN 3 [MAX 5 8 ] 4 ]", 3, id="min-max"),
    pytest.param("[SM 5 6 [MED 1 8 3 ] ]", 4, id="sum-mod-median-odd"),
    pytest.param("[MED 1 2 3 9 ]", 2, id="median-even-floor"),
    pytest.param("[MED 4 7 ]", 5, id="median-two"),
    pytest.param("[SM 9 9 9 ]", 7, id="sum-mod-wraps"),
    pytest.param("[MAX [SM 7 7 ] [MIN 8 [MED 2 2 9 ] ] 3 ]", 4, id="nested-3"),
    pytest.param("[MIN [MAX [MAX [MAX [MAX 1 2 ] 3 ] 4 ] 5 ] 6 ]", 5, id="deep-chain"),
    pytest.param("7", 7, id="bare-digit"),
)


@pytest.mark.parametrize("expr, value", LISTOPS_HAND)
def test_listops_evaluate_hand_examples(expr, value):
    assert listops_evaluate(expr) == value
    assert listops_evaluate(expr.split()) == value


@pytest.mark.parametrize("expr", (
    pytest.param("[MAX 2 9", id="unclosed"),
    pytest.param("[MAX 2 ] ]", id="extra-close"),
    pytest.param("[MAX ]", id="no-args"),
    pytest.param("[AVG 1 2 ]", id="unknown-op"),
    pytest.param("[MAX 1 ] [MIN 2 ]", id="two-roots"),
    pytest.param("12", id="two-digit"),
))
def test_listops_evaluate_rejects_malformed(expr):
    with pytest.raises(ValueError):
        listops_evaluate(expr)


def _max_depth_checking_arity(tokens, max_args=10):
    """Nesting depth of an expression; asserts every operator has 2..max_args arguments."""
    depth = deepest = 0
    args: list[int] = []
    for t in tokens:
        if t.startswith("["):
            if args:
                args[-1] += 1
            args.append(0)
            depth += 1
            deepest = max(deepest, depth)
        elif t == "]":
            assert 2 <= args.pop() <= max_args
            depth -= 1
        else:
            args[-1] += 1
    return deepest


@pytest.mark.parametrize("lo, hi", ((5, 40), (32, 256), (200, 600)), ids=("5-40", "32-256", "200-600"))
def test_listops_generator_lengths_values_and_structure(lo, hi):
    rng = random.Random(11)
    for _ in range(20):
        toks, val = listops_expression(rng, min_len=lo, max_len=hi, max_depth=10, max_args=10)
        assert lo <= len(toks) <= hi
        assert toks[0] in ("[MIN", "[MAX", "[MED", "[SM")  # the root is an operator
        assert listops_evaluate(toks) == val and 0 <= val <= 9
        assert _max_depth_checking_arity(toks) <= 10


def test_listops_max_args_respected():
    rng = random.Random(2)
    for _ in range(20):
        toks, _ = listops_expression(rng, min_len=10, max_len=200, max_args=3)
        _max_depth_checking_arity(toks, max_args=3)


def test_listops_dataset_padding_and_labels():
    b = listops_dataset(12, min_len=10, max_len=50, seed=4)
    assert b.inputs.shape[0] == 12 and b.inputs.shape[1] == int(b.lengths.max())
    for row, n, y in zip(b.inputs, b.lengths, b.labels):
        toks = [LISTOPS_VOCAB[i] for i in row[:n].tolist()]
        assert listops_evaluate(toks) == int(y)
        assert bool((row[n:] == 0).all())
    assert torch.equal(b.padding_mask.sum(1), b.lengths)
    again = listops_dataset(12, min_len=10, max_len=50, seed=4)
    assert torch.equal(b.inputs, again.inputs)


def test_listops_tokens_round_trip_and_errors():
    assert [LISTOPS_VOCAB[i] for i in listops_tokens(["[SM", "3", "]"])] == ["[SM", "3", "]"]
    with pytest.raises(ValueError, match="token"):
        listops_tokens(["[SM", "x", "]"])
    with pytest.raises(ValueError, match="min_len"):
        listops_expression(random.Random(0), min_len=10, max_len=5)


@pytest.mark.parametrize("points, front", (
    pytest.param([(1, 5), (2, 3), (3, 4), (4, 1)], [0, 1, 3], id="classic"),
    pytest.param([(1, 1), (2, 2), (3, 3)], [0], id="one-dominates"),
    pytest.param([(1, 3), (1, 2), (2, 2)], [1], id="ties"),
    pytest.param([(1, float("nan")), (2, 1)], [1], id="nan-ignored"),
))
def test_pareto_front(points, front):
    assert pareto_front(points) == front
