"""Single-process tests of the ring's plan and of the patterns seen through a shard.

The plan is checked exactly: mapping every planned call back to global positions must
cover each allowed (query, key) pair exactly once and no other pair.
"""

from __future__ import annotations

import pytest
import torch

from memattn import patterns
from memattn.distributed import layout_chunks, plan_ring, shard_positions
from memattn.distributed._patterns import HeadSlice, Shifted, shift

SW = patterns.sliding_window

# (id, world, layout, n_local, causal, pattern)
PLAN_CASES = (
    ("w2-zigzag-causal", 2, "zigzag", 10, True, None),
    ("w3-zigzag-causal", 3, "zigzag", 6, True, None),
    ("w4-zigzag-causal", 4, "zigzag", 14, True, None),
    ("w3-zigzag-full", 3, "zigzag", 6, False, None),
    ("w3-contig-causal", 3, "contiguous", 7, True, None),
    ("w4-contig-full", 4, "contiguous", 5, False, None),
    ("w3-contig-window-causal", 3, "contiguous", 7, True, SW(3)),
    ("w4-contig-window-causal-wide", 4, "contiguous", 7, True, SW(9)),
    ("w3-zigzag-window-causal", 3, "zigzag", 10, True, SW(4)),
    ("w3-contig-window-symmetric", 3, "contiguous", 7, False, SW(4, 2)),
    ("w2-zigzag-window-perhead", 2, "zigzag", 12, False, SW((2, 7), (1, 0))),
    ("w3-contig-window-or-causal", 3, "contiguous", 5, True, SW(2) | SW(0, 3)),
    ("w2-contig-big-chunk", 2, "contiguous", 300, True, SW(130)),
    ("w1-zigzag-causal", 1, "zigzag", 8, True, None),
)


def _global_mask(n: int, causal: bool, pattern, head: int) -> torch.Tensor:
    m = torch.ones(n, n, dtype=torch.bool)
    if pattern is not None:
        m &= pattern.dense(n, n, head=head)
    if causal:
        m &= patterns.causal().dense(n, n)
    return m


def _local_mask(task, head: int) -> torch.Tensor:
    nq, nk = task.q1 - task.q0, task.k1 - task.k0
    m = torch.ones(nq, nk, dtype=torch.bool)
    if task.pattern is not None:
        m &= task.pattern.dense(nq, nk, head=head)
    if task.causal:
        m &= patterns.causal().dense(nq, nk)
    return m


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_covers_each_allowed_pair_once(case):
    _, world, layout, n_local, causal, pattern = case
    plan = plan_ring(world, layout, n_local, causal=causal, pattern=pattern)
    n = world * n_local
    heads = pattern.num_heads if pattern is not None and pattern.num_heads else 1
    for h in range(heads):
        cover = torch.zeros(n, n, dtype=torch.int64)
        for r in range(world):
            qpos = shard_positions(n_local, layout, r, world)
            assert len(plan.tasks[r]) == plan.steps
            for t, tasks in enumerate(plan.tasks[r]):
                kpos = shard_positions(n_local, layout, plan.source(r, t), world)
                for task in tasks:
                    m = _local_mask(task, h).to(torch.int64)
                    gq = qpos[task.q0:task.q1][:, None]
                    gk = kpos[task.k0:task.k1][None, :]
                    cover.index_put_((gq.expand_as(m), gk.expand_as(m)), m, accumulate=True)
        expected = _global_mask(n, causal, pattern, h).to(torch.int64)
        assert torch.equal(cover, expected), f"head {h}: {int((cover != expected).sum())} pairs wrong"


def test_plan_zigzag_causal_balances_work():
    for world in (2, 3, 4, 5):
        plan = plan_ring(world, "zigzag", 8, causal=True)
        pairs = {plan.chunk_pairs_computed(r) for r in range(world)}
        calls = {plan.calls(r) for r in range(world)}
        assert pairs == {2 * world + 1}, (world, pairs)
        assert calls == {world}, (world, calls)   # one local causal call + one rectangle per other rank
        assert plan.steps == world


def test_plan_contiguous_causal_is_unbalanced():
    plan = plan_ring(4, "contiguous", 8, causal=True)
    assert [plan.calls(r) for r in range(4)] == [1, 2, 3, 4]
    assert plan.steps == 4


def test_plan_window_drops_out_of_reach_ranks():
    plan = plan_ring(4, "contiguous", 7, causal=True, pattern=SW(3))
    assert plan.steps == 2
    assert plan.sources(0) == (0,)
    assert [plan.sources(r) for r in (1, 2, 3)] == [(1, 0), (2, 1), (3, 2)]
    assert plan.chunk_pairs_computed(0) == 1 and plan.chunk_pairs_total == 4
    # a window reaching two ranks back needs three steps
    assert plan_ring(4, "contiguous", 7, causal=True, pattern=SW(9)).steps == 3


def test_plan_full_rectangles_are_single_calls():
    plan = plan_ring(2, "zigzag", 8, causal=True)
    (own,), (other,) = plan.tasks[0]
    assert (own.q0, own.q1, own.k0, own.k1, own.causal) == (0, 8, 0, 8, True)
    # rank 0 holds chunks 0 and 3; rank 1's keys (chunks 1, 2) are seen by chunk 3 only, unmasked
    assert (other.q0, other.q1, other.k0, other.k1, other.causal, other.pattern) == (4, 8, 0, 8, False, None)


@pytest.mark.parametrize("bad", (
    dict(world=0, layout="zigzag", n_local=4),
    dict(world=2, layout="ring", n_local=4),
    dict(world=2, layout="zigzag", n_local=5),
    dict(world=2, layout="contiguous", n_local=0),
), ids=("world0", "layout", "odd-zigzag", "empty"))
def test_plan_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="world|layout|n_local"):
        plan_ring(bad["world"], bad["layout"], bad["n_local"])


def test_layout_helpers():
    assert layout_chunks("zigzag", 0, 3) == (0, 5)
    assert layout_chunks("zigzag", 2, 3) == (2, 3)
    assert layout_chunks("contiguous", 2, 3) == (2,)
    assert shard_positions(4, "zigzag", 1, 2).tolist() == [2, 3, 4, 5]
    assert shard_positions(3, "contiguous", 2, 3).tolist() == [6, 7, 8]
    allpos = torch.cat([shard_positions(6, "zigzag", r, 3) for r in range(3)])
    assert sorted(allpos.tolist()) == list(range(18))
    with pytest.raises(ValueError, match="layout"):
        layout_chunks("diagonal", 0, 2)
    with pytest.raises(ValueError, match="n_local"):
        shard_positions(5, "zigzag", 0, 2)


# ------------------------------------------------------------------ shifted / head-sliced patterns
SHIFT_CASES = (
    ("window-back", SW(10), 16, 0),
    ("window-forward-shift", SW(3, 2), 0, 9),
    ("window-negative-left", SW(4), 20, 5),
    ("causal-and-window", SW(6) & patterns.causal(), 12, 3),
    ("window-or-window", SW(1) | SW(0, 2), 7, 7),
    ("per-head", SW((1, 12), (0, 3)), 11, 2),
    ("empty-reach", SW(2), 40, 0),
)


def _check_block_map(p, nq, nk, bq, bk):
    bm = p.block_map(nq, nk, bq, bk)
    for h in range(p.heads):
        dense = p.dense(nq, nk, head=h)
        listed = torch.zeros(bm.num_q_blocks, bm.num_kv_blocks, dtype=torch.bool)
        for qb, kb, full in bm.blocks(h):
            listed[qb, kb] = True
            tile = dense[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            assert tile.any(), f"head {h}: empty tile ({qb}, {kb}) listed"
            if full:
                assert tile.all(), f"head {h}: tile ({qb}, {kb}) marked full has a disallowed pair"
        for qb in range(bm.num_q_blocks):
            for kb in range(bm.num_kv_blocks):
                if dense[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk].any():
                    assert listed[qb, kb], f"head {h}: tile ({qb}, {kb}) with allowed pairs missing"


@pytest.mark.parametrize("case", SHIFT_CASES, ids=[c[0] for c in SHIFT_CASES])
def test_shifted_pattern_mask_and_block_map(case):
    _, base, qo, ko = case
    n_global = 64
    nq = nk = 13
    for p in (Shifted(base, qo, ko), shift(base, qo, ko)):
        for h in range(base.heads):
            want = base.dense(n_global, n_global, head=h)[qo:qo + nq, ko:ko + nk]
            assert torch.equal(p.dense(nq, nk, head=h), want), (p, h)
        _check_block_map(p, nq, nk, 4, 5)
        _check_block_map(p, nq, nk, 13, 13)


def test_shift_returns_plain_window_when_possible():
    assert shift(SW(10), 8, 0) == SW(2, 8)
    assert isinstance(shift(SW(3), 8, 0), Shifted)      # left would be negative
    assert shift(SW(5) & patterns.causal(), 4, 4) == SW(5) & patterns.causal()


def test_head_slice():
    base = SW((1, 2, 3, 4), (0, 0, 1, 1))
    sl = HeadSlice(base, 2, 2)
    assert sl.num_heads == 2
    for h in range(2):
        assert torch.equal(sl.dense(9, 9, head=h), base.dense(9, 9, head=h + 2))
    _check_block_map(sl, 9, 9, 2, 3)
