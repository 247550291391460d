"""memattn.eval.train: every catalogue mechanism trains on MQAR and ListOps (tiny budgets),
and the exact model learns a small MQAR."""

from __future__ import annotations

import pytest
import torch

from memattn.eval.tasks import listops_dataset
from memattn.eval.train import (ListOpsConfig, MQARConfig, TaskModel, listops_data, mechanism_names, task_options,
                                train_listops, train_mqar)
from memattn.mechanisms import catalog

MECHANISMS = tuple(catalog())


def test_every_catalogue_mechanism_is_listed():
    assert mechanism_names() == list(MECHANISMS)
    assert {"exact", "window", "linear", "performer", "linformer", "nystrom", "synthesizer", "pooled"} <= set(MECHANISMS)


@pytest.mark.parametrize("mech", MECHANISMS)
def test_task_options_are_accepted_and_sparse(mech):
    opts = task_options(mech, 256)
    from memattn.nn import Attention

    Attention(32, 2, mechanism=mech, **opts)  # every option is one the mechanism takes
    if mech == "window":
        assert opts == {"window": 32}  # not secretly full attention at L = 256


@pytest.mark.parametrize("mech", MECHANISMS)
def test_mqar_and_listops_run_for_every_mechanism(mech):
    mq = MQARConfig(steps=2, batch_size=4, seq_len=32, num_pairs=4, vocab_size=32, d_model=16, num_heads=2,
                    test_examples=8)
    r = train_mqar(mech, mq)
    assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 and r["causal"] == catalog()[mech].causal
    lo = ListOpsConfig(steps=2, batch_size=4, min_len=8, max_len=32, train_examples=16, test_examples=8, d_model=16,
                       num_heads=2)
    r = train_listops(mech, lo, listops_data(lo))
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 < r["majority"] <= 1.0


def test_exact_learns_small_mqar():
    cfg = MQARConfig(steps=150, batch_size=32, seq_len=32, num_pairs=4, vocab_size=64, d_model=32, num_heads=2,
                     lr=1e-2, test_examples=128)
    assert train_mqar("exact", cfg)["accuracy"] >= 0.9


def test_task_model_pooling_ignores_padding():
    torch.manual_seed(0)
    m = TaskModel(16, 10, d_model=16, layers=1, num_heads=2, mechanism="exact", max_len=16, pool=True).eval()
    b = listops_dataset(2, min_len=5, max_len=12, seed=1)
    x, mask = b.inputs, b.padding_mask
    with torch.no_grad():
        out = m(x, padding_mask=mask)
        row0 = m(x[:1, :int(b.lengths[0])], padding_mask=mask[:1, :int(b.lengths[0])])
    torch.testing.assert_close(out[:1], row0, atol=1e-5, rtol=1e-5)
