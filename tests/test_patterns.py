"""memattn.patterns: every pattern against a hand-written rule, block-map invariants,
density, hashing, validation, and the random draws.

The rules below are independent re-statements of design.md §3 in plain Python loops; they
never call ``mask``."""

from __future__ import annotations

import math

import pytest
import torch

from memattn import patterns as P

SIZES = ((17, 17), (13, 40), (64, 64), (1, 37), (50, 20))
SIZE_IDS = [f"{a}x{b}" for a, b in SIZES]


# --------------------------------------------------------------------------- rules
def rule_matrix(rule, nq: int, nk: int) -> torch.Tensor:
    rows = []
    for i in range(nq):
        qp = i + nk - nq
        rows.append([bool(rule(qp, j)) for j in range(nk)])
    return torch.tensor(rows, dtype=torch.bool).reshape(nq, nk)


def is_pow2(d: int) -> bool:
    if d < 1:
        return False
    while d % 2 == 0:
        d //= 2
    return d == 1


def r_window(left, right):
    return lambda q, k: q - left <= k <= q + right


def r_dilated(left, dil, right):
    return lambda q, k: q - left <= k <= q + right and (q - k) % dil == 0


def r_strided(strides, local):
    return lambda q, k: any(abs(q - k) % s == 0 for s in strides) or abs(q - k) <= local


def r_fixed(block, summary):
    return lambda q, k: q // block == k // block or k % block >= block - summary


def r_exponential(local):
    return lambda q, k: abs(q - k) == 0 or is_pow2(abs(q - k)) or abs(q - k) <= local


def r_global(idx):
    s = set(idx)
    return lambda q, k: q in s or k in s


def r_longformer(window, idx):
    s = set(idx)
    return lambda q, k: abs(q - k) <= window // 2 or q in s or k in s


def r_document(lengths):
    def doc(p):
        start = 0
        for d, n in enumerate(lengths):
            if start <= p < start + n:
                return d
            start += n
        return None
    return lambda q, k: doc(q) is not None and doc(q) == doc(k)


def r_block_sparse(layout, bs):
    lay = layout.tolist()

    def rule(q, k):
        if q < 0 or k < 0 or q // bs >= len(lay) or k // bs >= len(lay[0]):
            return False
        return bool(lay[q // bs][k // bs])
    return rule


def r_bigbird_no_random(bs, wb, gb, nk):
    nb = -(-nk // bs)
    glob = set(range(min((gb + 1) // 2, nb))) | set(range(max(nb - gb // 2, 0), nb))
    return lambda q, k: abs(q // bs - k // bs) <= wb // 2 or q // bs in glob or k // bs in glob


LAYOUT = torch.tensor([[(3 * r + 5 * c) % 4 != 0 for c in range(14)] for r in range(14)])
LENGTHS = (3, 10, 1, 30, 6, 20)  # sum 70

# (id, pattern, rule factory (nq, nk, head) -> rule)
CASES = [
    ("full", P.full(), lambda nq, nk, h: (lambda q, k: True)),
    ("causal", P.causal(), lambda nq, nk, h: (lambda q, k: k <= q)),
    ("window_5_2", P.sliding_window(5, 2), lambda nq, nk, h: r_window(5, 2)),
    ("window_0", P.sliding_window(0), lambda nq, nk, h: r_window(0, 0)),
    ("dilated_9_2_3", P.dilated(9, 2, 3), lambda nq, nk, h: r_dilated(9, 2, 3)),
    ("dilated_12_3", P.dilated(12, 3), lambda nq, nk, h: r_dilated(12, 3, 0)),
    ("strided_3_5_l2", P.strided(3, 5, local=2), lambda nq, nk, h: r_strided((3, 5), 2)),
    ("strided_11", P.strided(11), lambda nq, nk, h: r_strided((11,), 0)),
    ("fixed_4_2", P.fixed(4, 2), lambda nq, nk, h: r_fixed(4, 2)),
    ("fixed_5_1", P.fixed(5), lambda nq, nk, h: r_fixed(5, 1)),
    ("exponential_0", P.exponential(), lambda nq, nk, h: r_exponential(0)),
    ("exponential_3", P.exponential(3), lambda nq, nk, h: r_exponential(3)),
    ("global_tokens", P.global_tokens([0, 3, 4, 5, 20]), lambda nq, nk, h: r_global((0, 3, 4, 5, 20))),
    ("longformer_6", P.longformer(6, [1, 2, 30]), lambda nq, nk, h: r_longformer(6, (1, 2, 30))),
    ("longformer_7_noglobal", P.longformer(7), lambda nq, nk, h: r_longformer(7, ())),
    ("bigbird_norandom", P.bigbird(4, 3, 2, 0), lambda nq, nk, h: r_bigbird_no_random(4, 3, 2, nk)),
    ("bigbird_norandom_g3", P.bigbird(5, 1, 3, 0), lambda nq, nk, h: r_bigbird_no_random(5, 1, 3, nk)),
    ("document", P.document(LENGTHS), lambda nq, nk, h: r_document(LENGTHS)),
    ("block_sparse", P.block_sparse(LAYOUT, 5), lambda nq, nk, h: r_block_sparse(LAYOUT, 5)),
    ("mask_mod", P.from_mask_mod(lambda b, h, q, k: (q - k) % 7 == 0),
     lambda nq, nk, h: (lambda q, k: (q - k) % 7 == 0)),
]

# per-head patterns: (id, pattern, rule factory)
HEAD_CASES = [
    ("window_heads", P.sliding_window((1, 3, 7), (0, 2, 1)),
     lambda nq, nk, h: r_window((1, 3, 7)[h], (0, 2, 1)[h])),
    ("dilated_heads", P.dilated((4, 9), (2, 3), (0, 5)),
     lambda nq, nk, h: r_dilated((4, 9)[h], (2, 3)[h], (0, 5)[h])),
    ("dilated_heads_left_only", P.dilated((4, 8, 16), 2),
     lambda nq, nk, h: r_dilated((4, 8, 16)[h], 2, 0)),
    ("longformer_heads", P.longformer((2, 10), [0, 33]),
     lambda nq, nk, h: r_longformer((2, 10)[h], (0, 33))),
    ("block_sparse_heads", P.block_sparse(torch.stack([LAYOUT, ~LAYOUT]), 5),
     lambda nq, nk, h: r_block_sparse(torch.stack([LAYOUT, ~LAYOUT])[h], 5)),
    ("mask_mod_heads", P.from_mask_mod(lambda b, h, q, k: (q - k).abs() <= h, num_heads=3),
     lambda nq, nk, h: (lambda q, k: abs(q - k) <= h)),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("nq,nk", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("name,pattern,rule", CASES, ids=_ids(CASES))
def test_dense_matches_rule(name, pattern, rule, nq, nk):
    expect = rule_matrix(rule(nq, nk, 0), nq, nk)
    got = pattern.dense(nq, nk)
    assert got.dtype == torch.bool and got.shape == (nq, nk)
    assert torch.equal(got, expect), f"{pattern!r} differs from its rule at {nq}x{nk}"


@pytest.mark.parametrize("nq,nk", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("name,pattern,rule", HEAD_CASES, ids=_ids(HEAD_CASES))
def test_dense_per_head_matches_rule(name, pattern, rule, nq, nk):
    assert pattern.num_heads is not None and pattern.num_heads >= 2
    for h in range(pattern.num_heads):
        assert torch.equal(pattern.dense(nq, nk, head=h), rule_matrix(rule(nq, nk, h), nq, nk)), (name, h)


@pytest.mark.parametrize("name,pattern,rule", HEAD_CASES, ids=_ids(HEAD_CASES))
def test_mask_broadcasts_over_heads(name, pattern, rule):
    # h shaped (1, H, 1, 1) as the reference backend passes it
    nq = nk = 23
    H = pattern.num_heads
    qp = torch.arange(nq).view(1, 1, nq, 1)
    kp = torch.arange(nk).view(1, 1, 1, nk)
    m = pattern.for_sizes(nq, nk).mask(torch.arange(2).view(2, 1, 1, 1), torch.arange(H).view(1, H, 1, 1), qp, kp)
    m = torch.broadcast_to(m, (2, H, nq, nk))
    for h in range(H):
        assert torch.equal(m[1, h], pattern.dense(nq, nk, head=h))


def test_combinators_match_rules():
    nq, nk = 40, 60
    a, b = P.sliding_window(5), P.global_tokens([0, 9])
    both = rule_matrix(lambda q, k: (q - 5 <= k <= q or q in (0, 9) or k in (0, 9)) and k <= q, nq, nk)
    assert torch.equal(((a | b) & P.causal()).dense(nq, nk), both)
    assert torch.equal((P.document(LENGTHS) & P.causal()).dense(nq, nk),
                       rule_matrix(lambda q, k: r_document(LENGTHS)(q, k) and k <= q, nq, nk))
    heads = P.sliding_window((1, 4)) & P.causal()
    assert heads.num_heads == 2
    assert torch.equal(heads.dense(nq, nk, head=1), rule_matrix(r_window(4, 0), nq, nk))
    with pytest.raises(ValueError, match="heads"):
        P.sliding_window((1, 2)) & P.longformer((1, 2, 3))


# ----------------------------------------------------------------- block-map invariants
def tile_truth(dense: torch.Tensor, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any allowed, all allowed) per tile of a dense mask; padding counts for neither."""
    nq, nk = dense.shape
    qb, kb = -(-nq // bq), -(-nk // bk)
    pad = (0, kb * bk - nk, 0, qb * bq - nq)
    any_ = torch.nn.functional.pad(dense, pad, value=False).reshape(qb, bq, kb, bk).any(3).any(1)
    all_ = torch.nn.functional.pad(dense, pad, value=True).reshape(qb, bq, kb, bk).all(3).all(1)
    return any_, all_


def check_block_map(p: P.Pattern, nq: int, nk: int, bq: int, bk: int, *, no_empty: bool, exact_full: bool) -> None:
    bm = p.block_map(nq, nk, bq, bk)
    QB, KB = -(-nq // bq), -(-nk // bk)
    assert bm.num_heads == (p.num_heads or 1)
    assert (bm.num_q_blocks, bm.num_kv_blocks) == (QB, KB)
    counts, idx, ful = bm.kv_counts, bm.kv_indices, bm.kv_full
    for h in range(bm.num_heads):
        any_, all_ = tile_truth(p.dense(nq, nk, head=h), bq, bk)
        listed = torch.tensor(list(bm.blocks(h)), dtype=torch.int64).reshape(-1, 3)
        q, k, f = listed[:, 0], listed[:, 1], listed[:, 2].bool()
        # q blocks ascending, key blocks strictly ascending within a q block (so no duplicates)
        assert bool((q[1:] >= q[:-1]).all())
        same = q[1:] == q[:-1]
        assert bool((k[1:][same] > k[:-1][same]).all()), "key blocks not strictly ascending"
        L = torch.zeros(QB, KB, dtype=torch.bool)
        F = torch.zeros(QB, KB, dtype=torch.bool)
        L[q, k] = True
        F[q, k] = f
        # the padded views agree with the listing
        assert torch.equal(counts[h].long(), torch.bincount(q, minlength=QB))
        slot = torch.arange(q.numel()) - torch.repeat_interleave(torch.cumsum(counts[h].long(), 0) - counts[h].long(), counts[h].long())
        assert torch.equal(idx[h][q, slot].long(), k) and torch.equal(ful[h][q, slot], f)
        assert int(ful[h].sum()) == int(f.sum())
        missing = torch.nonzero(any_ & ~L).tolist()
        assert not missing, f"{p!r}: head {h} tiles with allowed pairs not listed: {missing[:5]}"
        wrong = torch.nonzero(F & ~all_).tolist()
        assert not wrong, f"{p!r}: head {h} tiles marked full with a masked pair: {wrong[:5]}"
        if no_empty:
            empty = torch.nonzero(L & ~any_).tolist()
            assert not empty, f"{p!r}: head {h} listed tiles without an allowed pair: {empty[:5]}"
        if exact_full:
            lost = torch.nonzero(L & all_ & ~F).tolist()
            assert not lost, f"{p!r}: head {h} all-allowed tiles not marked full: {lost[:5]}"


BLOCKS = ((4, 4), (8, 3), (5, 16), (1, 1), (128, 64))
BLOCK_IDS = [f"b{a}x{b}" for a, b in BLOCKS]
MAP_SIZES = ((17, 17), (13, 40), (64, 64), (1, 37), (50, 20), (70, 70))
MAP_SIZE_IDS = [f"{a}x{b}" for a, b in MAP_SIZES]

# (id, pattern, listed tiles never empty, full flags exact)
MAP_CASES = [(c[0], c[1], True, True) for c in CASES + HEAD_CASES if c[0] != "strided_3_5_l2"] + [
    # small strides take the per-tile path, whose full flags are conservative away from the band
    ("strided_3_5_l2", P.strided(3, 5, local=2), True, False),
    ("random_3", P.random(3, seed=1), True, True),
    ("random_7", P.random(7), True, True),
    ("random_all", P.random(100), True, True),
    ("bigbird", P.bigbird(4, 3, 2, 2, seed=3), True, True),
    ("bigbird_b3", P.bigbird(3, 1, 1, 3), True, True),
    ("window_or_global_and_causal", (P.sliding_window(5) | P.global_tokens([0, 9])) & P.causal(), True, True),
    ("document_and_causal", P.document(LENGTHS) & P.causal(), True, True),
    ("heads_and_causal", P.sliding_window((1, 3, 7), (0, 2, 1)) & P.causal(), True, True),
    # intersections of windows/documents filter tiles entry by entry (no causal map is built)
    ("window_and_causal", P.sliding_window(6, 6) & P.causal(), True, True),
    ("causal_and_document_and_window", P.causal() & (P.document(LENGTHS) & P.sliding_window(4, 9)), True, True),
    ("document_and_heads", P.document(LENGTHS) & P.sliding_window((2, 30), (3, 0)), True, True),
    ("full_and_document", P.full() & P.document(LENGTHS), True, True),
    ("bigbird_and_causal", P.bigbird(4, 3, 2, 2, seed=3) & P.causal(), False, True),
    ("random_and_causal", P.random(5, seed=2) & P.causal(), False, True),
    ("dilated_and_document", P.dilated(12, 3, 12) & P.document(LENGTHS), False, False),
    # an intersection of listings can hold tiles where the two patterns never meet
    ("strided_and_exponential", P.strided(7) & P.exponential(), False, False),
    ("dilated_or_longformer_heads", P.dilated((4, 9), 2) | P.longformer((2, 10), [5]), True, False),
]


@pytest.mark.parametrize("bq,bk", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("nq,nk", MAP_SIZES, ids=MAP_SIZE_IDS)
@pytest.mark.parametrize("name,pattern,no_empty,exact_full", MAP_CASES, ids=[c[0] for c in MAP_CASES])
def test_block_map_invariants(name, pattern, no_empty, exact_full, nq, nk, bq, bk):
    check_block_map(pattern, nq, nk, bq, bk, no_empty=no_empty, exact_full=exact_full)


LARGER = [
    ("window", P.sliding_window(37, 5)), ("dilated", P.dilated(90, 7)), ("strided_big", P.strided(61, 67, local=3)),
    ("exponential", P.exponential(9)), ("fixed", P.fixed(48, 5)), ("longformer", P.longformer(60, [0, 1, 2, 150])),
    ("bigbird", P.bigbird(16, 3, 2, 3)), ("document", P.document((100, 1, 250, 30, 330))),
    ("random", P.random(12, seed=4)),
]


@pytest.mark.parametrize("nq,nk,bq,bk", ((300, 300, 64, 64), (200, 700, 32, 128), (513, 257, 128, 32)),
                         ids=("300", "200x700", "513x257"))
@pytest.mark.parametrize("name,pattern", LARGER, ids=[c[0] for c in LARGER])
def test_block_map_invariants_larger(name, pattern, nq, nk, bq, bk):
    check_block_map(pattern, nq, nk, bq, bk, no_empty=True, exact_full=True)


def test_strided_full_band_interior_is_marked():
    # the local band's interior tiles are all-allowed and must be marked full
    bm = P.strided(2, local=40).block_map(256, 256, 8, 8)
    full = {(q, k) for q, k, f in bm.blocks() if f}
    assert {(t, t) for t in range(32)} <= full


def _dense_density(p: P.Pattern, nq: int, nk: int) -> float:
    return sum(float(p.dense(nq, nk, head=h).double().mean()) for h in range(p.heads)) / p.heads


# document and block_sparse cover 70 positions: their density is checked on their extent below
DENSITY_CASES = [c[:2] for c in MAP_CASES if "document" not in c[0] and "block_sparse" not in c[0]]


@pytest.mark.parametrize("nq,nk", ((300, 300), (200, 700), (1, 333), (129, 100)), ids=("300", "200x700", "1x333", "129x100"))
@pytest.mark.parametrize("name,pattern", DENSITY_CASES, ids=[c[0] for c in DENSITY_CASES])
def test_density_matches_dense(name, pattern, nq, nk):
    assert pattern.density(nq, nk) == pytest.approx(_dense_density(pattern, nq, nk), abs=1e-12)


FIXED_EXTENT = [c[:2] for c in MAP_CASES if "document" in c[0] or "block_sparse" in c[0]]


@pytest.mark.parametrize("nq,nk", ((70, 70), (33, 70), (70, 50), (1, 70)), ids=("70", "33x70", "70x50", "1x70"))
@pytest.mark.parametrize("name,pattern", FIXED_EXTENT, ids=[c[0] for c in FIXED_EXTENT])
def test_density_matches_dense_fixed_extent(name, pattern, nq, nk):
    assert pattern.density(nq, nk) == pytest.approx(_dense_density(pattern, nq, nk), abs=1e-12)


def test_density_of_fixed_extent_patterns():
    lengths = (100, 1, 250, 30, 319)
    p = P.document(lengths)
    assert p.density(700, 700) == pytest.approx(sum(n * n for n in lengths) / 700 ** 2)
    lay = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    q = P.block_sparse(lay, 64)
    assert q.density(384, 384) == pytest.approx(float(lay.double().mean()))


# ------------------------------------------------------------------- random patterns
@pytest.mark.parametrize("k,nq,nk", ((3, 17, 17), (7, 13, 10), (16, 9, 40), (40, 5, 40), (100, 6, 37),
                                     (1, 50, 20), (5, 64, 64), (6, 1, 7)),
                         ids=lambda v: str(v))
def test_random_exact_keys_per_row(k, nq, nk):
    d = P.random(k, seed=11).dense(nq, nk)
    assert d.sum(dim=1).tolist() == [min(k, nk)] * nq


def test_random_deterministic_and_seeded():
    a = P.random(5, seed=3).dense(64, 64)
    assert torch.equal(a, P.random(5, seed=3).dense(64, 64))
    assert not torch.equal(a, P.random(5, seed=4).dense(64, 64))
    assert P.random(5, seed=3) == P.random(5, seed=3)
    assert P.random(5, seed=3) != P.random(5, seed=4)


def test_random_rows_depend_on_position_not_nq():
    full = P.random(4, seed=2).dense(50, 50)
    assert torch.equal(P.random(4, seed=2).dense(1, 50), full[-1:])
    assert torch.equal(P.random(4, seed=2).dense(13, 50), full[-13:])


def test_random_mask_agrees_with_block_map_and_dense():
    p = P.random(6, seed=9)
    for nq, nk in ((30, 70), (70, 30), (33, 33)):
        d = p.dense(nq, nk)
        any_, all_ = tile_truth(d, 8, 8)
        bm = p.block_map(nq, nk, 8, 8)
        listed = {(q, k): f for q, k, f in bm.blocks()}
        assert listed == {(q, k): bool(all_[q, k]) for q, k in zip(*map(torch.Tensor.tolist, torch.nonzero(any_, as_tuple=True)))}


def test_random_needs_sizes_for_mask():
    p = P.random(3)
    with pytest.raises(ValueError, match="for_sizes"):
        p.mask(0, 0, torch.arange(3)[:, None], torch.arange(3)[None])
    m = p.for_sizes(3, 9).mask(0, 0, torch.arange(6, 9)[:, None], torch.arange(9)[None])
    assert torch.equal(m, p.dense(3, 9))


def test_random_keys_are_spread_uniformly():
    # 4000 rows of 5 keys out of 20: every key is chosen with probability 1/4
    d = P.random(5, seed=0).dense(4000, 20)
    freq = d.double().mean(dim=0)
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.03), freq
    # pairs are unbiased too: P(both of keys 0 and 1) = 5/20 * 4/19
    both = (d[:, 0] & d[:, 1]).double().mean()
    assert float(both) == pytest.approx(5 / 20 * 4 / 19, abs=0.015)


# ------------------------------------------------------------------------- bigbird
def _bigbird_parts(p, nq, nk):
    bs, hw = p.block_size, p.window_blocks // 2
    nb = -(-nk // bs)
    g1, g2 = (p.global_blocks + 1) // 2, p.global_blocks // 2
    glob = set(range(min(g1, nb))) | set(range(max(nb - g2, 0), nb))
    return bs, hw, nb, glob


@pytest.mark.parametrize("nq,nk", ((64, 64), (70, 70), (13, 70), (90, 61), (1, 45)), ids=("64", "70", "13x70", "90x61", "1x45"))
@pytest.mark.parametrize("args", ((4, 3, 2, 2, 0), (5, 3, 3, 3, 7), (3, 1, 1, 2, 1), (8, 5, 0, 1, 2)),
                         ids=("b4w3g2r2", "b5w3g3r3", "b3w1g1r2", "b8w5g0r1"))
def test_bigbird_structure(args, nq, nk):
    p = P.bigbird(*args)
    d = p.dense(nq, nk)
    bs, hw, nb, glob = _bigbird_parts(p, nq, nk)
    rows: dict[int, set[int]] = {}
    for i in range(nq):
        qp = i + nk - nq
        qb = qp // bs
        allowed_blocks = {j // bs for j in range(nk) if d[i, j]}
        # whole blocks: a key block is either entirely allowed or not at all
        for kb in allowed_blocks:
            assert all(d[i, j] for j in range(kb * bs, min(kb * bs + bs, nk)))
        if qb in glob:
            assert allowed_blocks == set(range(nb))
            continue
        window = {kb for kb in range(nb) if abs(kb - qb) <= hw}
        assert window | glob <= allowed_blocks
        rand = allowed_blocks - window - glob
        candidates = set(range(nb)) - window - glob
        assert len(rand) == min(p.random_blocks, len(candidates)), (qb, rand, candidates)
        # the same draw for every query of the block
        assert rows.setdefault(qb, rand) == rand


def test_bigbird_globals_first_and_last_blocks_and_partial_last_block():
    p = P.bigbird(block_size=4, window_blocks=1, global_blocks=3, random_blocks=0)
    d = p.dense(22, 22)                      # 6 blocks, the last has 2 positions
    assert d[:8].all() and d[:, :8].all()     # first ceil(3/2) = 2 blocks are global
    assert d[20:].all() and d[:, 20:].all()   # last floor(3/2) = 1 block (partial) is global
    assert not d[8:12, 12:20].any()           # block 2 sees only itself and the globals
    assert d[8:12, 8:12].all()


def test_bigbird_random_blocks_vary_and_are_seeded():
    a = P.bigbird(4, 3, 2, 2, seed=0).dense(128, 128)
    assert torch.equal(a, P.bigbird(4, 3, 2, 2, seed=0).dense(128, 128))
    assert not torch.equal(a, P.bigbird(4, 3, 2, 2, seed=1).dense(128, 128))
    # rows depend on the position, not nq: a decoding query sees the last row
    assert torch.equal(P.bigbird(4, 3, 2, 2, seed=0).dense(1, 128), a[-1:])


def test_bigbird_random_table_is_outside_window_and_globals():
    p = P.bigbird(16, 3, 2, 3, seed=5)
    qblocks, table = p.random_block_table(1024, 1024)
    nb = 64
    for qb, row in zip(qblocks.tolist(), table.tolist()):
        drawn = [x for x in row if x >= 0]
        if qb in (0, nb - 1):
            assert drawn == []
            continue
        assert len(drawn) == 3 and len(set(drawn)) == 3
        assert all(abs(x - qb) > 1 and x not in (0, nb - 1) for x in drawn)


# -------------------------------------------------------------------------- document
def test_document_beyond_lengths_raises():
    p = P.document((4, 6))
    with pytest.raises(ValueError, match="nk=11"):
        p.dense(11, 11)
    with pytest.raises(ValueError, match="nk=11"):
        p.block_map(4, 11)
    with pytest.raises(ValueError, match="nk=11"):
        (p & P.causal()).density(11, 11)
    # mask is total: positions outside every document attend nothing
    m = p.mask(0, 0, torch.tensor([[-1], [3], [10]]), torch.tensor([[0, 3, 4, 10]]))
    assert m.tolist() == [[False] * 4, [True, True, False, False], [False] * 4]
    # a shorter problem cuts the last document
    assert torch.equal(p.dense(7, 7), rule_matrix(r_document((4, 6)), 7, 7))
    # more queries than keys: the leading queries sit at negative positions, in no document
    d = p.dense(12, 10)
    assert not d[:2].any() and torch.equal(d[2:], rule_matrix(r_document((4, 6)), 10, 10))


def test_document_doc_ids():
    p = P.document([2, 3, 1])
    assert p.doc_ids(torch.arange(-1, 7)).tolist() == [-1, 0, 0, 1, 1, 1, 2, -1]


# ------------------------------------------------------------------------ mask_mod
def test_mask_mod_batch_union():
    def by_batch(b, h, q, k):
        return (q - k).abs() <= b * 8
    p = P.from_mask_mod(by_batch, batch_size=3)
    bm = p.block_map(64, 64, 8, 8)
    d = [P.from_mask_mod(by_batch).mask(torch.tensor(b), 0, torch.arange(64)[:, None], torch.arange(64)[None])
         for b in range(3)]
    union = d[0] | d[1] | d[2]
    inter = d[0] & d[1] & d[2]
    any_, _ = tile_truth(union, 8, 8)
    _, all_ = tile_truth(inter, 8, 8)
    listed = {(q, k): f for q, k, f in bm.blocks()}
    assert set(listed) == {tuple(x) for x in torch.nonzero(any_).tolist()}
    assert {k for k, f in listed.items() if f} == {tuple(x) for x in torch.nonzero(all_).tolist()}
    # b = 0 alone: the diagonal tiles only
    assert P.from_mask_mod(by_batch).block_map(64, 64, 8, 8).nnz == 8


def test_mask_mod_must_return_bool():
    p = P.from_mask_mod(lambda b, h, q, k: q - k)
    with pytest.raises(TypeError, match="bool"):
        p.dense(4, 4)


# ----------------------------------------------------------------- identity and repr
def _all_patterns():
    return [c[1] for c in CASES + HEAD_CASES] + [P.random(3), P.bigbird(), P.random(3).for_sizes(4, 9)]


def test_patterns_hashable_and_equal_by_value():
    pats = _all_patterns()
    table = {p: i for i, p in enumerate(pats)}
    assert len(table) == len(pats)
    again = [
        P.full(), P.causal(), P.sliding_window(5, 2), P.dilated(9, 2, 3), P.strided(5, 3, local=2), P.fixed(4, 2),
        P.exponential(3), P.global_tokens([5, 4, 3, 0, 20, 0]), P.longformer(6, [30, 2, 1]), P.bigbird(4, 3, 2, 0),
        P.document(list(LENGTHS)), P.block_sparse(LAYOUT.clone(), 5), P.sliding_window([1, 3, 7], [0, 2, 1]),
        P.random(3), P.bigbird(),
    ]
    for p in again:
        assert p in table, p
        assert hash(p) == hash(p)
    assert P.sliding_window(5) != P.sliding_window(6)
    assert P.block_sparse(LAYOUT, 5) != P.block_sparse(~LAYOUT, 5)
    assert P.document([1, 2]) != P.document([2, 1])


REPRS = [
    (P.dilated(9, 2, 3), "dilated(left=9, dilation=2, right=3)"),
    (P.strided(5, 3, local=2), "strided(3, 5, local=2)"),
    (P.fixed(4, 2), "fixed(block=4, summary=2)"),
    (P.exponential(3), "exponential(local=3)"),
    (P.random(4, seed=2), "random(keys_per_query=4, seed=2)"),
    (P.global_tokens([3, 1]), "global_tokens((1, 3))"),
    (P.longformer(6, [0]), "longformer(window=6, global_indices=(0,))"),
    (P.bigbird(), "bigbird(block_size=64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)"),
    (P.document([2, 3]), "document(lengths=(2, 3))"),
    (P.block_sparse(torch.eye(3, dtype=torch.bool), 4), "block_sparse(layout=3x3 with 3 blocks, block_size=4)"),
    (P.sliding_window(4) & P.causal(), "(sliding_window(left=4, right=0) & causal())"),
]


@pytest.mark.parametrize("pattern,text", REPRS, ids=[t.split("(")[0] + str(i) for i, (_, t) in enumerate(REPRS)])
def test_repr(pattern, text):
    assert repr(pattern) == text


def test_repr_mask_mod_and_long_lists():
    def prefix(b, h, q, k):
        return k <= q
    assert repr(P.from_mask_mod(prefix, num_heads=2)) == "from_mask_mod(prefix, num_heads=2)"
    assert "1000 documents" in repr(P.document([1] * 1000))
    assert "64 positions" in repr(P.global_tokens(range(64)))


# ----------------------------------------------------------------------- validation
BAD_INPUTS = [
    (lambda: P.sliding_window(-1), ValueError, "left"),
    (lambda: P.sliding_window(3, -2), ValueError, "right"),
    (lambda: P.sliding_window((1, 2), (1, 2, 3)), ValueError, "head counts"),
    (lambda: P.dilated(8, 0), ValueError, "dilation"),
    (lambda: P.dilated(-8, 2), ValueError, "left"),
    (lambda: P.dilated((8, 4), (2, 2, 2)), ValueError, "head counts"),
    (lambda: P.strided(), ValueError, "strides"),
    (lambda: P.strided(0), ValueError, "strides"),
    (lambda: P.strided(4, local=-1), ValueError, "local"),
    (lambda: P.fixed(0), ValueError, "block"),
    (lambda: P.fixed(4, 0), ValueError, "summary"),
    (lambda: P.fixed(4, 5), ValueError, "summary"),
    (lambda: P.exponential(-1), ValueError, "local"),
    (lambda: P.random(0), ValueError, "keys_per_query"),
    (lambda: P.random(3, seed=-1), ValueError, "seed"),
    (lambda: P.global_tokens([]), ValueError, "indices"),
    (lambda: P.global_tokens([1, -2]), ValueError, "indices"),
    (lambda: P.global_tokens(3), TypeError, "indices"),
    (lambda: P.longformer(-2), ValueError, "window"),
    (lambda: P.longformer(4, [0.5]), ValueError, "global_indices"),
    (lambda: P.bigbird(block_size=0), ValueError, "block_size"),
    (lambda: P.bigbird(window_blocks=-1), ValueError, "window_blocks"),
    (lambda: P.bigbird(global_blocks=-1), ValueError, "global_blocks"),
    (lambda: P.bigbird(random_blocks=-1), ValueError, "random_blocks"),
    (lambda: P.document([]), ValueError, "lengths"),
    (lambda: P.document([3, 0]), ValueError, "lengths"),
    (lambda: P.document([3, -1]), ValueError, "lengths"),
    (lambda: P.document(5), TypeError, "lengths"),
    (lambda: P.block_sparse(torch.ones(4, dtype=torch.bool), 2), ValueError, "layout"),
    (lambda: P.block_sparse(torch.ones(1, 2, 2, 2, dtype=torch.bool), 2), ValueError, "layout"),
    (lambda: P.block_sparse(torch.full((2, 2), 2), 2), ValueError, "layout"),
    (lambda: P.block_sparse("x", 2), TypeError, "layout"),
    (lambda: P.block_sparse(torch.ones(2, 2, dtype=torch.bool), 0), ValueError, "block_size"),
    (lambda: P.from_mask_mod(3), TypeError, "fn"),
    (lambda: P.from_mask_mod(lambda b, h, q, k: q >= k, num_heads=0), ValueError, "num_heads"),
    (lambda: P.from_mask_mod(lambda b, h, q, k: q >= k, batch_size=0), ValueError, "batch_size"),
    (lambda: P.causal().block_map(0, 4), ValueError, "nq"),
    (lambda: P.causal().block_map(4, 4, 0, 4), ValueError, "block_q"),
    (lambda: P.causal().dense(4, -1), ValueError, "nk"),
    (lambda: P.sliding_window((1, 2)).dense(4, 4, head=2), ValueError, "head"),
    (lambda: P.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4).dense(9, 9), ValueError, "nk=9"),
]


@pytest.mark.parametrize("make,exc,arg", BAD_INPUTS, ids=[f"{i:02d}-{a}" for i, (_, _, a) in enumerate(BAD_INPUTS)])
def test_validation_names_the_argument(make, exc, arg):
    with pytest.raises(exc, match=arg):
        make()


def test_for_sizes_and_kernel_spec_defaults():
    for p in (P.causal(), P.longformer(4, [0]), P.document([5])):
        assert p.for_sizes(5, 5) is p
        assert p.kernel_spec(5, 5) is None
    r = P.random(2) & P.causal()
    assert r.for_sizes(3, 5) != r and r.for_sizes(3, 5).for_sizes(3, 5) == r.for_sizes(3, 5)


def test_patterns_exported():
    for name in ("full", "causal", "sliding_window", "dilated", "strided", "fixed", "exponential", "random",
                 "global_tokens", "longformer", "bigbird", "document", "block_sparse", "from_mask_mod"):
        assert callable(getattr(P, name)) and name in P.__all__
    assert math.isclose(P.exponential().density(3, 3), 1.0)
    assert math.isclose(P.exponential().density(4, 4), 14 / 16)


# Predicates evaluated where the positions live: the Triton launcher evaluates the bit tiles
# of partially allowed tiles on the GPU, and a constant made on the CPU (a global-index list,
# a block layout) used to make it fall back to the CPU (1 s for Longformer at 64k on the
# H200). The meta device stands in for the GPU here: a predicate that mixes devices fails on
# it, and its result must come back on it. (random and bigbird read their draws' range with
# .item(), which meta tensors cannot do; they move their table to the positions' device.)
@pytest.mark.parametrize("name", ["full", "causal", "global_tokens", "longformer", "block_sparse", "document",
                                  "dilated", "strided", "fixed", "exponential", "window_per_head"])
def test_mask_follows_the_positions_device(name):
    pats = {"full": P.full(), "causal": P.causal(), "global_tokens": P.global_tokens([0, 5]),
            "longformer": P.longformer(16, [0, 3]), "document": P.document([30, 34]),
            "block_sparse": P.block_sparse(torch.eye(4, dtype=torch.bool), 16),
            "dilated": P.dilated(16, 2), "strided": P.strided(7, 13, local=8),
            "fixed": P.fixed(16, 4), "exponential": P.exponential(local=4),
            "window_per_head": P.sliding_window((4, 8), (0, 2))}
    p = pats[name].for_sizes(64, 64)
    q = torch.arange(64, device="meta")[:, None]
    k = torch.arange(64, device="meta")[None, :]
    m = p.mask(torch.tensor(0), torch.tensor(1), q, k)
    assert m.device.type == "meta" and m.shape == (64, 64)
