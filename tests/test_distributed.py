"""Ring and Ulysses attention on CPU processes (gloo), against single-process attention.

Each test spawns one small group of processes (2 or 3 ranks) that runs a whole grid of
cases; a child that fails raises, and its traceback fails the test. Every spawn has a
deadline, and every process group a short timeout, so nothing can hang the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memattn
from memattn import patterns
from memattn.distributed import (last_ring_stats, ring_attention, shard, shard_positions, ulysses_attention,
                                 unshard)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5          # float32, outputs and gradients (issue 7 acceptance)
SPAWN_DEADLINE = 300  # seconds for one process group to finish its grid (2 shared cores)
PG_TIMEOUT = 60       # process-group timeout inside the grids
SW = patterns.sliding_window


def _backend() -> str:
    """The default ("auto" → cpu) once the cpu backend has a backward, else the reference
    (MEMATTN_DIST_TEST_BACKEND overrides, e.g. to isolate a backend problem)."""
    if os.environ.get("MEMATTN_DIST_TEST_BACKEND"):
        return os.environ["MEMATTN_DIST_TEST_BACKEND"]
    try:
        from memattn.backends import cpu
    except ImportError:
        return "reference"
    return "auto" if hasattr(cpu, "attention_backward") else "reference"


# ----------------------------------------------------------------------------- harness
def _entry(rank: int, world: int, store: str, pg_timeout: float, job: str, arg) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=pg_timeout))
    try:
        JOBS[job](rank, world, arg)
    finally:
        if job not in ("dead_before_call", "dead_mid_backward", "stalled"):
            dist.destroy_process_group()


def _spawn(world: int, job: str, arg=None, pg_timeout: float = PG_TIMEOUT, deadline: float = SPAWN_DEADLINE) -> None:
    tmp = tempfile.mkdtemp(prefix="memattn-dist-")
    try:
        ctx = mp.start_processes(_entry, args=(world, os.path.join(tmp, "store"), pg_timeout, job, arg),
                                 nprocs=world, join=False, start_method="spawn")
        end = time.monotonic() + deadline
        while not ctx.join(timeout=max(0.1, min(5.0, end - time.monotonic()))):
            if time.monotonic() > end:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                pytest.fail(f"{job} on {world} ranks did not finish within {deadline} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _close(case: str, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{case}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{case}: {name} has non-finite values"
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{case}: {name} max error {err:.3g} > {TOL}"


# ----------------------------------------------------------------------------- the grids
# Ring: (id, layout, causal, pattern, B, Hq, Hkv, n_local, D, Dv, softcap, expected steps or None,
#        smallest world at which some (query chunk, key chunk) pair must be skipped, or None)
RING_CASES = (
    ("zigzag-causal-gqa", "zigzag", True, None, 1, 2, 1, 10, 8, 6, 0.0, None, None),
    ("zigzag-full", "zigzag", False, None, 2, 2, 2, 10, 8, 8, 0.0, None, None),
    ("zigzag-causal-softcap", "zigzag", True, None, 1, 2, 2, 6, 8, 8, 3.0, None, None),
    ("contiguous-causal", "contiguous", True, None, 1, 2, 2, 7, 8, 8, 0.0, None, 2),
    ("contiguous-full-gqa", "contiguous", False, None, 2, 4, 2, 7, 8, 5, 0.0, None, None),
    ("contiguous-window-causal", "contiguous", True, SW(3), 1, 2, 1, 7, 8, 8, 0.0, 2, 2),
    ("zigzag-window-causal", "zigzag", True, SW(4), 1, 2, 2, 10, 8, 8, 0.0, None, 2),
    ("contiguous-window-symmetric", "contiguous", False, SW(4, 2), 1, 2, 2, 7, 8, 8, 0.0, None, 3),
    ("zigzag-window-per-head", "zigzag", False, SW((2, 9), (1, 0)), 1, 2, 2, 10, 8, 8, 0.0, None, 2),
)
# Ulysses: (id, layout, causal, pattern, B, heads per rank, kv heads per rank, n_local, D, return_lse)
ULYSSES_CASES = (
    ("contiguous-causal-gqa", "contiguous", True, None, 1, 2, 1, 7, 8, True),
    ("contiguous-full", "contiguous", False, None, 2, 1, 1, 7, 8, False),
    ("zigzag-causal", "zigzag", True, None, 1, 2, 2, 10, 8, False),
    ("zigzag-window-per-head", "zigzag", True, "per-head", 1, 2, 1, 10, 8, True),
)


def _reference(q, k, v, *, causal, pattern, softcap=0.0, backend):
    """Single-process attention on the whole sequence: out, lse and the gradients of <out, g>."""
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = memattn.attention(q, k, v, causal=causal, pattern=pattern, softcap=softcap, backend=backend,
                                 return_lse=True)
    g = _randn(torch.Generator().manual_seed(99), *out.shape)
    (out * g).sum().backward()
    return out.detach(), lse, q.grad, k.grad, v.grad, g


def job_grid(rank: int, world: int, _arg) -> None:
    job_overlap_and_unshard(rank, world, None)
    backend = _backend()
    for i, (cid, layout, causal, pattern, B, Hq, Hkv, n, D, Dv, softcap, steps, skip_from) in enumerate(RING_CASES):
        case = f"ring[{cid}, world={world}, rank={rank}, backend={backend}]"
        gen = torch.Generator().manual_seed(1000 + i)
        N = n * world
        q, k, v = _randn(gen, B, Hq, N, D), _randn(gen, B, Hkv, N, D), _randn(gen, B, Hkv, N, Dv)
        out, lse, dq, dk, dv, g = _reference(q, k, v, causal=causal, pattern=pattern, softcap=softcap,
                                             backend=backend)
        ql, kl, vl = (shard(t, 2, layout).clone().requires_grad_(True) for t in (q, k, v))
        assert torch.equal(shard(torch.arange(N), 0, layout), shard_positions(n, layout, rank, world)), case
        o, l = ring_attention(ql, kl, vl, causal=causal, layout=layout, pattern=pattern, softcap=softcap,
                              backend=backend, return_lse=True)
        (o * shard(g, 2, layout)).sum().backward()
        for name, got, want in (("out", o, out), ("lse", l, lse), ("dq", ql.grad, dq), ("dk", kl.grad, dk),
                                ("dv", vl.grad, dv)):
            _close(case, name, got.detach(), shard(want, 2, layout))
        full = unshard(o.detach(), 2, layout)
        _close(case, "unshard(out)", full, out)
        stats = last_ring_stats()
        assert stats is not None and stats.world == world and stats.rank == rank, case
        skipped = torch.tensor([stats.chunk_pairs_skipped])
        dist.all_reduce(skipped)
        if skip_from is not None and world >= skip_from:  # out-of-reach key blocks must be skipped
            assert skipped.item() > 0, f"{case}: nothing skipped on any rank ({stats})"
        elif pattern is None and not causal:
            assert skipped.item() == 0, f"{case}: full attention skipped {skipped.item()} chunk pairs"
        if steps is not None:
            assert stats.steps == steps, f"{case}: {stats.steps} ring steps, expected {steps}"
            assert stats.sources == ((rank,) if rank == 0 else (rank, rank - 1)), f"{case}: {stats.sources}"
            assert stats.attention_calls == (1 if rank == 0 else 2), f"{case}: {stats.attention_calls} calls"

    import memattn.distributed.ulysses as uly
    calls = []
    real_a2a = uly.dist.all_to_all_single

    def counted(*a, **kw):
        calls.append(1)
        return real_a2a(*a, **kw)

    for i, (cid, layout, causal, pattern, B, hq, hkv, n, D, want_lse) in enumerate(ULYSSES_CASES):
        gen = torch.Generator().manual_seed(2000 + i)
        Hq, Hkv, N = hq * world, hkv * world, n * world
        if pattern == "per-head":
            pattern = SW(tuple(2 + 3 * h for h in range(Hq)))
        q, k, v = _randn(gen, B, Hq, N, D), _randn(gen, B, Hkv, N, D), _randn(gen, B, Hkv, N, D)
        out, lse, dq, dk, dv, g = _reference(q, k, v, causal=causal, pattern=pattern, backend=backend)
        for keep in (True, False):
            case = f"ulysses[{cid}, keep_heads={keep}, world={world}, rank={rank}, backend={backend}]"
            ql, kl, vl = (shard(t, 2, layout).clone().requires_grad_(True) for t in (q, k, v))
            res = ulysses_attention(ql, kl, vl, layout=layout, causal=causal, pattern=pattern, backend=backend,
                                    return_lse=want_lse, keep_heads=keep)
            o = res[0] if want_lse else res
            uly.dist.all_to_all_single = counted
            try:
                calls.clear()
                (o * shard(g, 2, layout)).sum().backward()
            finally:
                uly.dist.all_to_all_single = real_a2a
            # the backward: dout there and three gradients back, plus q, k, v, out again without kept heads
            assert len(calls) == (4 if keep else 8), f"{case}: {len(calls)} all-to-alls in the backward"
            checks = [("out", o, out), ("dq", ql.grad, dq), ("dk", kl.grad, dk), ("dv", vl.grad, dv)]
            if want_lse:
                checks.append(("lse", res[1], lse))
            for name, got, want in checks:
                _close(case, name, got.detach(), shard(want, 2, layout))


def job_overlap_and_unshard(rank: int, world: int, _arg) -> None:
    """The next block's send/receive is posted before the current block is computed; unshard's backward."""
    import memattn.distributed.ring as ring_mod

    events: list[str] = []
    orig_exchange, orig_attention = ring_mod._exchange, ring_mod.attention

    def exchange(*a, **k):
        events.append("post")
        return orig_exchange(*a, **k)

    def attention(*a, **k):
        events.append("compute")
        return orig_attention(*a, **k)

    ring_mod._exchange, ring_mod.attention = exchange, attention
    try:
        x = torch.randn(1, 2, 8, 4)
        ring_attention(x, x, x, causal=True, layout="zigzag", backend=_backend())
    finally:
        ring_mod._exchange, ring_mod.attention = orig_exchange, orig_attention
    assert events == ["post", "compute"] * (world - 1) + ["compute"], events

    # unshard is differentiable: the gradient of the sum of every rank's loss
    full = _randn(torch.Generator().manual_seed(5), 2, 6 * world, 3)
    for layout in ("zigzag", "contiguous"):
        xl = shard(full, 1, layout).clone().requires_grad_(True)
        y = unshard(xl, 1, layout)
        assert torch.equal(y.detach(), full), layout
        weights = [_randn(torch.Generator().manual_seed(50 + r), *full.shape) for r in range(world)]
        (y * weights[rank]).sum().backward()
        want = shard(sum(weights), 1, layout)
        assert torch.allclose(xl.grad, want, atol=1e-6, rtol=0), layout


def job_subgroups(rank: int, world: int, _arg) -> None:
    """Ranks 1 and 2 form a ring of their own (group ranks differ from global ranks); rank 0 rings alone."""
    backend = _backend()
    g0 = dist.new_group([0])
    g12 = dist.new_group([1, 2])
    group, members = (g0, [0]) if rank == 0 else (g12, [1, 2])
    W, me = len(members), members.index(rank)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (_randn(gen, 1, 2, 8 * W, 8) for _ in range(3))
    out, _, dq, dk, dv, g = _reference(q, k, v, causal=True, pattern=None, backend=backend)
    ql, kl, vl = (shard(t, 2, "zigzag", group=group).clone().requires_grad_(True) for t in (q, k, v))
    o = ring_attention(ql, kl, vl, group=group, causal=True, backend=backend)
    (o * shard(g, 2, "zigzag", group=group)).sum().backward()
    case = f"subgroup ring (global rank {rank}, group rank {me} of {W})"
    for name, got, want in (("out", o, out), ("dq", ql.grad, dq), ("dk", kl.grad, dk), ("dv", vl.grad, dv)):
        _close(case, name, got.detach(), shard(want, 2, "zigzag", group=group))
    assert last_ring_stats().steps == W
    o_ref = ring_attention(ql.detach(), kl.detach(), vl.detach(), group=group, causal=True, backend="reference")
    _close(case + " backend=reference", "out", o_ref, shard(out, 2, "zigzag", group=group))
    u = ulysses_attention(shard(q, 2, "contiguous", group=group), shard(k, 2, "contiguous", group=group),
                          shard(v, 2, "contiguous", group=group), group=group, causal=True, backend=backend)
    _close(case + " ulysses", "out", u, shard(out, 2, "contiguous", group=group))


def job_mismatch(rank: int, world: int, _arg) -> None:
    """Disagreeing ranks and impossible head splits raise ValueError on every rank, then the group still works."""
    x = torch.randn(1, 2, 8 + 2 * rank, 4)
    with pytest.raises(ValueError, match=r"n_local \(per rank: \[8, 10\]\)"):
        ring_attention(x, x, x, causal=True)
    with pytest.raises(ValueError, match="n_local"):
        ulysses_attention(x, x, x)
    with pytest.raises(ValueError, match="x.shape"):
        unshard(x, 2, "contiguous")
    y = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="causal"):
        ring_attention(y, y, y, causal=bool(rank))
    with pytest.raises(ValueError, match="keep_heads"):      # the backwards would move different tensors
        ulysses_attention(y, y, y, keep_heads=bool(rank))
    with pytest.raises(ValueError, match="pattern"):
        ring_attention(y, y, y, pattern=SW(2 + rank))
    with pytest.raises(ValueError, match="dtype"):
        ring_attention(y.double() if rank else y, y.double() if rank else y, y.double() if rank else y)
    # local errors need no communication
    with pytest.raises(ValueError, match="q's head count 3 must be divisible by the world size 2"):
        ulysses_attention(torch.randn(1, 3, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4))
    with pytest.raises(ValueError, match="k's head count 1"):
        ulysses_attention(torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4))
    with pytest.raises(ValueError, match="dropout_p"):
        ulysses_attention(y, y, y, dropout_p=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ulysses_attention(y, y, y, window=3)
    with pytest.raises(TypeError, match="keep_heads must be a bool"):
        ulysses_attention(y, y, y, keep_heads=1)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(y, y, y, layout="striped")
    with pytest.raises(ValueError, match="even"):
        ring_attention(torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4))
    with pytest.raises(ValueError, match="self-attention"):
        ring_attention(y, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    with pytest.raises(TypeError, match="pattern"):
        ring_attention(y, y, y, pattern="causal")
    with pytest.raises(ValueError, match="backend"):
        ring_attention(y, y, y, backend="cuda")
    with pytest.raises(ValueError, match="divisible by 4"):
        shard(torch.randn(1, 2, 6, 4), 2, "zigzag")
    with pytest.raises(ValueError, match="dim"):
        shard(y, 4, "zigzag")
    # the group is still usable after the errors
    o = ring_attention(y, y, y, causal=True, backend=_backend())
    assert o.shape == y.shape and torch.isfinite(o).all()


def job_dead_before_call(rank: int, world: int, pg_timeout: float) -> None:
    """Rank 1 exits right away; rank 0's next ring call must raise within the group timeout."""
    dist.barrier()
    if rank == 1:
        os._exit(0)
    time.sleep(0.5)
    x = torch.randn(1, 2, 8, 4)
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017  (gloo raises RuntimeError / DistBackendError)
        ring_attention(x, x, x, causal=True, backend=_backend())
    elapsed = time.monotonic() - t0
    assert elapsed < pg_timeout + 5, f"the error took {elapsed:.1f} s (timeout {pg_timeout} s)"
    os._exit(0)


def job_dead_mid_backward(rank: int, world: int, pg_timeout: float) -> None:
    """Rank 1 dies after the forward; rank 0's backward (blocked on P2P) must raise within the timeout."""
    x = torch.randn(1, 2, 8, 4, requires_grad=True)
    o = ring_attention(x, x, x, causal=True, backend=_backend())
    dist.barrier()
    if rank == 1:
        os._exit(0)
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017
        o.sum().backward()
    elapsed = time.monotonic() - t0
    assert elapsed < pg_timeout + 5, f"the error took {elapsed:.1f} s (timeout {pg_timeout} s)"
    os._exit(0)


def job_stalled(rank: int, world: int, pg_timeout: float) -> None:
    """Rank 1 is alive but never joins; rank 0 must raise once the group timeout passes."""
    dist.barrier()
    if rank == 1:
        time.sleep(pg_timeout + 4)
        os._exit(0)
    x = torch.randn(1, 2, 8, 4)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):  # noqa: B017
        ring_attention(x, x, x, causal=True, backend=_backend())
    elapsed = time.monotonic() - t0
    assert pg_timeout * 0.5 <= elapsed < pg_timeout + 5, f"the error took {elapsed:.1f} s (timeout {pg_timeout} s)"
    os._exit(0)


JOBS = {"grid": job_grid, "subgroups": job_subgroups, "mismatch": job_mismatch,
        "dead_before_call": job_dead_before_call, "dead_mid_backward": job_dead_mid_backward,
        "stalled": job_stalled}


# ----------------------------------------------------------------------------- tests
@pytest.mark.slow  # 10-30 s: spawns processes (run in CI)
@pytest.mark.parametrize("world", (2, 3), ids=("world2", "world3"))
def test_ring_and_ulysses_match_single_process(world):
    """Also: the next block is posted before the current one is computed; unshard's gradient."""
    _spawn(world, "grid")


@pytest.mark.slow  # 10-30 s: spawns processes (run in CI)
def test_subgroups_and_world_of_one():
    _spawn(3, "subgroups")


def test_mismatched_ranks_raise_on_every_rank():
    _spawn(2, "mismatch")


@pytest.mark.parametrize("job", ("dead_before_call", "dead_mid_backward", "stalled"))
def test_dead_or_stalled_rank_ends_in_error_within_timeout(job):
    timeout = 5.0 if job == "stalled" else 10.0
    _spawn(2, job, arg=timeout, pg_timeout=timeout, deadline=120)


@pytest.mark.slow  # 10-30 s: spawns processes (run in CI)
def test_example_runs_under_torchrun():
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "examples" / "ring_attention.py"),
           "--seq-len", "96", "--heads", "4", "--head-dim", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SPAWN_DEADLINE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ring attention (zigzag, causal): OK" in res.stdout, res.stdout
    assert "ulysses attention (causal): OK" in res.stdout, res.stdout


def test_gpu_script_reach_demo_choice():
    """gpu_ring.demo_mechanisms: the reach demo runs the mechanisms clearly below one GPU's need
    and names the others with theirs (the CPU smoke run skips the demo itself)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_ring_choice", ROOT / "scripts" / "gpu_ring.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    need = {"single": 16.2, "ring-zigzag": 12.6, "ring-contiguous": 12.6, "ulysses": 16.0, "ulysses-lean": 13.1}
    assert mod.demo_mechanisms(need) == (["ring-zigzag", "ulysses-lean"], {"ulysses": 16.0})
    assert mod.demo_mechanisms({"single": 10.0, "ulysses": 9.5}) == ([], {"ulysses": 9.5})
    assert mod.demo_mechanisms({"single": 10.0}) == ([], {})


@pytest.mark.slow  # 10-30 s: spawns processes (run in CI)
def test_gpu_script_logic_on_cpu(tmp_path):
    """scripts/gpu_ring.py --cpu-smoke: the acceptance script's control flow (gloo, tiny sizes)."""
    import json

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "scripts" / "gpu_ring.py"),
           "--out", str(tmp_path), "--cpu-smoke", "--seq-lens", "128,256", "--heads", "2", "--head-dim", "8",
           "--check-n", "64", "--reps", "1", "--mechs", "ring-zigzag,ulysses,ulysses-lean"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SPAWN_DEADLINE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "ring.json").read_text())
    assert all(c["pass"] for c in data["correctness"]), data["correctness"]
    assert [(r["mechanism"], r["N"], r["status"]) for r in data["rows"]] == [
        (m, n, "ok") for n in (128, 256) for m in ("single", "ring-zigzag", "ulysses", "ulysses-lean")]
    assert res.stdout.strip().splitlines()[-1].startswith("acceptance:"), res.stdout[-1000:]


@pytest.mark.slow  # 10-30 s: spawns processes (run in CI)
def test_gpu_script_profile_on_cpu(tmp_path):
    """scripts/gpu_ring.py --profile: one profiled step per mechanism on every rank, gathered
    by rank 0 into ring.json, and no timing rows after it (gloo, tiny sizes: no CUDA kernel,
    so every device category is 0)."""
    import json

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "scripts" / "gpu_ring.py"),
           "--out", str(tmp_path), "--cpu-smoke", "--seq-lens", "128", "--heads", "2", "--head-dim", "8",
           "--check-n", "64", "--profile", "ulysses,ring-zigzag"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SPAWN_DEADLINE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "ring.json").read_text())
    assert [(p["mechanism"], p["rank"]) for p in data["profile"]] == [
        ("ulysses", 0), ("ulysses", 1), ("ring-zigzag", 0), ("ring-zigzag", 1)]
    assert all(p["wall_ms"] > 0 and set(p["device_ms_by_category"]) == {"nccl", "attention", "other"}
               for p in data["profile"])
    assert data["rows"] == []
