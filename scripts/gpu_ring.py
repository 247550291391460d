"""Ring and Ulysses attention on several GPUs against one GPU (issue 7 acceptance run).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        torchrun --nproc_per_node=2 scripts/gpu_ring.py --out $OUT

What it does (all ranks take part; rank 0 writes and prints):

1. correctness at a small N (default 4096): causal, bf16, H=16, D=128. Ring (zigzag and
   contiguous) and Ulysses against a float32 oracle (the reference backend), judged by the
   design.md §4 rule against the single-GPU bf16 kernel's own error: out <= 2x, grads <= 3x,
   plus the rounding atol 2·|ref + 0.3 − 0.3 − ref|max;
2. speed: causal fwd+bwd, bf16, B=1, H=16, D=128, N in {64k, 128k, 256k}: one GPU (rank 0,
   the same ``memattn.attention`` kernel) vs ring zigzag, ring contiguous and Ulysses over all
   ranks; time = max over ranks of a synchronised step, median of repeats; peak memory per GPU;
3. reach: from the measured bytes per token, the N one H200 can hold vs what W GPUs hold,
   and a demonstration at a larger N with every GPU capped (``set_per_process_memory_fraction``)
   between the per-GPU need of the ring and that of one GPU: one GPU OOMs, the ring runs.

Writes ``$OUT/ring.json`` after every row (partial results survive a crash) and prints the
table last. Stays inside ``--budget-s`` (default 360 s; the whole run < 8 minutes): rows that would not fit are
recorded as skipped. Written for any number of GPUs.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import memattn  # noqa: E402
from memattn.distributed import last_ring_stats, ring_attention, shard, ulysses_attention  # noqa: E402

GIB = 2 ** 30
T0 = time.monotonic()
DEV = ["cuda"]          # "cpu" for --cpu-smoke (gloo, float32): checks the script's logic without a GPU
DTYPE = [torch.bfloat16]


def sync() -> None:
    if DEV[0] == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def causal_flops(B: int, H: int, N: int, D: int) -> float:
    """fwd+bwd FLOPs of causal attention (design.md §5: 3.5 × 4·B·H·pairs·D)."""
    return 3.5 * 4.0 * B * H * (N * (N + 1) / 2) * D


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=DEV[0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def elapsed() -> float:
    """Seconds since start, the same on every rank (max over ranks), so budget decisions agree."""
    return max_over_ranks(time.monotonic() - T0)


def all_ranks(x: float) -> list[float]:
    t = torch.tensor([x], dtype=torch.float64, device=DEV[0])
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(o.item()) for o in out]


# ----------------------------------------------------------------------------- mechanisms
MECHS = ("single", "ring-zigzag", "ring-contiguous", "ulysses", "ulysses-lean")


def run_mech(mech: str, q, k, v, *, causal: bool = True):
    if mech == "single":
        return memattn.attention(q, k, v, causal=causal)
    if mech == "ring-zigzag":
        return ring_attention(q, k, v, causal=causal, layout="zigzag")
    if mech == "ring-contiguous":
        return ring_attention(q, k, v, causal=causal, layout="contiguous")
    if mech == "ulysses":
        return ulysses_attention(q, k, v, causal=causal)
    if mech == "ulysses-lean":         # shards saved for the backward, regrouped there (eight all-to-alls)
        return ulysses_attention(q, k, v, causal=causal, keep_heads=False)
    raise ValueError(mech)


def layout_of(mech: str) -> str:
    return "zigzag" if mech == "ring-zigzag" else "contiguous"


# ----------------------------------------------------------------------------- 1. correctness
def correctness(args, world: int) -> list[dict]:
    B, H, D, N = 1, args.heads, args.head_dim, args.check_n
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(B, H, N, D, generator=gen).to(DEV[0]) for _ in range(4))
    # float32 oracle (reference backend, exact float32 matmuls)
    torch.backends.cuda.matmul.allow_tf32 = False
    q32, k32, v32 = (t.clone().requires_grad_(True) for t in (q, k, v))
    o32 = memattn.attention(q32, k32, v32, causal=True, backend="reference")
    o32.backward(g)
    oracle = {"out": o32.detach(), "dq": q32.grad, "dk": k32.grad, "dv": v32.grad}
    del q32, k32, v32, o32

    def errors(got: dict, layout: str | None) -> dict:
        res = {}
        for name, ref in oracle.items():
            want = ref if layout is None else shard(ref, 2, layout)
            res[name] = (got[name].float() - want).abs().max().item()
        return res

    qb, kb, vb, gb = (t.to(DTYPE[0]) for t in (q, k, v, g))
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (qb, kb, vb))
    os_ = memattn.attention(qs, ks, vs, causal=True)
    os_.backward(gb)
    single = errors({"out": os_.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}, None)
    atol = {name: 2 * ((ref.to(DTYPE[0]).float() + 0.3 - 0.3) - ref.to(DTYPE[0]).float()).abs().max().item()
            for name, ref in oracle.items()}
    rows = [{"mechanism": "single", "N": N, "errors": single, "pass": True}]
    for mech in MECHS[1:]:
        lay = layout_of(mech)
        try:
            ql, kl, vl = (shard(t, 2, lay).detach().clone().requires_grad_(True) for t in (qb, kb, vb))
            ol = run_mech(mech, ql, kl, vl)
            ol.backward(shard(gb, 2, lay))
            local = errors({"out": ol.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}, lay)
            errs = {name: max_over_ranks(val) for name, val in local.items()}
            limit = {name: (2 if name == "out" else 3) * single[name] + atol[name] for name in errs}
            ok = all(errs[name] <= limit[name] for name in errs)
            rows.append({"mechanism": mech, "N": N, "world": world, "errors": errs, "limit": limit, "pass": ok})
        except Exception as exc:  # noqa: BLE001
            rows.append({"mechanism": mech, "N": N, "world": world, "pass": False, "error": repr(exc)[:500]})
            log(traceback.format_exc())
        log(f"correctness {mech}: {rows[-1]}")
    return rows


# ----------------------------------------------------------------------------- 2. speed
def time_step(mech: str, N: int, args, world: int, reps: int, warmup: int = 1) -> dict:
    """Median over reps of the max-over-ranks fwd+bwd time; peak memory per GPU."""
    B, H, D = 1, args.heads, args.head_dim
    rank = dist.get_rank()
    distributed = mech != "single"
    n = N // world if distributed else N
    active = distributed or rank == 0
    row: dict = {"mechanism": mech, "N": N, "world": world if distributed else 1}
    status, times, peak = "ok", [], 0.0
    cuda = DEV[0] == "cuda"
    if active:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            q, k, v, dout = (torch.randn(B, H, n, D, device=DEV[0], dtype=DTYPE[0]) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)

            def step():
                out = run_mech(mech, q, k, v)
                out.backward(dout)
                q.grad = k.grad = v.grad = None

            for _ in range(warmup):
                step()
            sync()
            for _ in range(reps):
                if distributed:
                    dist.barrier()
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                dt = time.perf_counter() - t0
                times.append(max_over_ranks(dt) if distributed else dt)
            peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
            if distributed:
                row["ring_stats"] = _stats_dict() if mech.startswith("ring") else None
            del q, k, v, dout
        except torch.OutOfMemoryError:
            status = "OOM"
        except Exception as exc:  # noqa: BLE001
            status = "error: " + repr(exc)[:300]
            log(traceback.format_exc())
        if cuda:
            torch.cuda.empty_cache()
    if distributed:
        peaks = all_ranks(peak)
        row["peak_gib_per_gpu"] = peaks
        row["peak_gib"] = max(peaks)
    else:
        row["peak_gib"] = peak
    row["status"] = status
    if times:
        row["times_s"] = times
        row["time_ms"] = statistics.median(times) * 1e3
        row["tflops"] = causal_flops(B, H, N, D) / statistics.median(times) / 1e12
    return row


def _stats_dict() -> dict | None:
    s = last_ring_stats()
    return None if s is None else {"steps": s.steps, "attention_calls": s.attention_calls,
                                   "chunk_pairs_computed": s.chunk_pairs_computed,
                                   "chunk_pairs_total": s.chunk_pairs_total}


def broadcast_row(row: dict) -> dict:
    """Rank 0's single-GPU row to every rank (so budget decisions agree)."""
    box = [row]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- 3. reach
def demo_mechanisms(need: dict[str, float]) -> tuple[list[str], dict[str, float]]:
    """Which distributed mechanisms the reach demo runs: those whose per-GPU need (GiB, from
    the measured bytes per token) is clearly below one GPU's, and the others with their need
    (left out, and said so).

    Example:
        >>> demo_mechanisms({"single": 16.0, "ring-zigzag": 12.0, "ulysses": 15.5})
        (['ring-zigzag'], {'ulysses': 15.5})
    """
    shown = [m for m in ("ring-zigzag", "ulysses", "ulysses-lean") if m in need]
    chosen = [m for m in shown if need[m] < 0.9 * need["single"]]
    return chosen, {m: round(need[m], 2) for m in shown if m not in chosen}


def reach(args, world: int, rows: list[dict], budget_left: float) -> dict:
    if DEV[0] != "cuda":
        return {"status": "skipped: CPU smoke run"}
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    by = {(r["mechanism"], r["N"]): r for r in rows if r.get("status") == "ok"}
    sizes = sorted({N for (m, N) in by if m == "single" and (("ring-zigzag", N) in by)})
    if not sizes:
        return {"status": "skipped: no N where both one GPU and the ring ran"}
    n1 = sizes[-1]
    per_tok = {m: by[(m, n1)]["peak_gib"] * GIB / n1 for m in MECHS if (m, n1) in by}
    res: dict = {"gpu_memory_gib": total, "measured_at_N": n1,
                 "bytes_per_token": per_tok,
                 "projected_max_N": {m: int(total * GIB * 0.95 / b) for m, b in per_tok.items()}}
    n_reach = 2 * n1
    need = {m: b * n_reach / GIB for m, b in per_tok.items()}
    dist_mechs, res["not_below_one_gpu"] = demo_mechanisms(need)
    if not dist_mechs:
        res["demo"] = {"status": f"skipped: no distributed mechanism's per-GPU need is below one GPU's "
                                 f"({need['single']:.1f} GiB) at N={n_reach}: {res['not_below_one_gpu']}"}
        return res
    worst = max(need[m] for m in dist_mechs)
    # one step each at twice the N (4x the work): every distributed mechanism, and one GPU if it does fit after all
    est = 4 * (sum(by[(m, n1)]["time_ms"] for m in dist_mechs) + by[("single", n1)]["time_ms"]) / 1e3
    if est > budget_left:
        res["demo"] = {"status": f"skipped: needs ~{est:.0f} s, {budget_left:.0f} s of budget left"}
        return res
    cap = (need["single"] + worst) / 2
    frac = min(1.0, cap / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(frac)
    demo: dict = {"N": n_reach, "cap_gib_per_gpu": cap, "need_gib": need}
    try:
        single = time_step("single", n_reach, args, world, reps=1, warmup=0)
        demo["single"] = broadcast_row(single)
        for m in dist_mechs:
            demo[m] = time_step(m, n_reach, args, world, reps=1, warmup=0)
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    demo["reached"] = demo["single"]["status"] != "ok" and all(demo[m]["status"] == "ok" for m in dist_mechs)
    res["demo"] = demo
    return res


# ----------------------------------------------------------------------------- main
def table(result: dict) -> str:
    lines = [f"causal fwd+bwd, {result['meta']['dtype']}, B=1, H={result['meta']['heads']}, D={result['meta']['head_dim']}, "
             f"{result['meta']['world']} x {result['meta']['gpu']}",
             f"{'mechanism':<16} {'N':>8} {'GPUs':>4} {'ms':>10} {'TFLOP/s':>8} {'speedup':>8} {'peak GiB/GPU':>13}  status"]
    single = {r["N"]: r for r in result["rows"] if r["mechanism"] == "single"}
    for r in result["rows"]:
        sp = ""
        s = single.get(r["N"])
        if r["mechanism"] != "single" and s and "time_ms" in s and "time_ms" in r:
            sp = f"{s['time_ms'] / r['time_ms']:.2f}x"
        ms = f"{r['time_ms']:.1f}" if "time_ms" in r else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        lines.append(f"{r['mechanism']:<16} {r['N']:>8} {r['world']:>4} {ms:>10} {tf:>8} {sp:>8} "
                     f"{r.get('peak_gib', 0):>13.2f}  {r['status']}")
    lines.append("correctness (N={}): ".format(result["meta"]["check_n"]) + ", ".join(
        f"{c['mechanism']} {'pass' if c['pass'] else 'FAIL'}" for c in result["correctness"]))
    acc = result.get("acceptance", {})
    if acc:
        lines.append("acceptance: " + ", ".join(f"{k}={v}" for k, v in acc.items()))
    demo = result.get("reach", {}).get("demo", {})
    if "N" in demo:
        lines.append(f"reach: GPUs capped at {demo['cap_gib_per_gpu']:.1f} GiB, N={demo['N']}: one GPU "
                     f"{demo['single']['status']}; " + "; ".join(
                         f"{m} {demo[m]['status']} ({demo[m].get('peak_gib', 0):.1f} GiB/GPU)"
                         for m in MECHS[1:] if m in demo))
        left = result.get("reach", {}).get("not_below_one_gpu")
        if left:
            lines.append("  not in the demo (per-GPU need at that N, GiB, not below one GPU's): " + ", ".join(
                f"{m} {g}" for m, g in left.items()))
    elif demo:
        lines.append(f"reach demo: {demo.get('status')}")
    proj = result.get("reach", {}).get("projected_max_N")
    if proj:
        lines.append("projected max N on one full GPU each: " + ", ".join(f"{m} {n:,}" for m, n in proj.items()))
    return "\n".join(lines)


def profile_step(mech: str, N: int, args, world: int, steps: int = 2) -> dict:
    """Where one distributed fwd+bwd step's device time goes, on this rank: kernel time by
    category (NCCL collectives, memattn's attention kernels, everything else: copies,
    elementwise) summed over ``steps`` profiled steps after one warm-up, per step, plus the
    step's wall time and the top kernels. For the mechanisms whose speedup falls short."""
    from torch.profiler import ProfilerActivity, profile

    B, H, D = 1, args.heads, args.head_dim
    n = N // world if mech != "single" else N
    q, k, v, dout = (torch.randn(B, H, n, D, device=DEV[0], dtype=DTYPE[0]) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        run_mech(mech, q, k, v).backward(dout)
        q.grad = k.grad = v.grad = None

    step()
    sync()
    dist.barrier()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV[0] == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    wall = (time.perf_counter() - t0) / steps * 1e3
    kern: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0.0)
        if us and ev.device_type == torch.autograd.DeviceType.CUDA:
            kern[ev.key] = kern.get(ev.key, 0.0) + us / steps / 1e3
    cats = {"nccl": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in kern.items():
        cat = "nccl" if "nccl" in name.lower() else "attention" if "_attn" in name else "other"
        cats[cat] += ms
    top = sorted(kern.items(), key=lambda kv: -kv[1])[:10]
    return {"mechanism": mech, "N": N, "rank": dist.get_rank(), "wall_ms": round(wall, 2),
            "device_ms_by_category": {c: round(v, 2) for c, v in cats.items()},
            "top_kernels_ms": {nm[:70]: round(ms, 2) for nm, ms in top}}


def main() -> int:
    ap = argparse.ArgumentParser(description="ring / Ulysses attention vs one GPU")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seq-lens", default="65536,131072,262144")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check-n", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=360.0, help="stop starting rows after this much time")
    ap.add_argument("--mechs", default=",".join(MECHS[1:]), help="distributed mechanisms to time")
    ap.add_argument("--no-reach", action="store_true")
    ap.add_argument("--profile", default="",
                    help="MECH[,MECH]: after the correctness check, profile one step of each at the first of "
                         "--seq-lens on every rank (profile_step) and stop")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="gloo + CPU + float32 at tiny sizes: exercises this script without a GPU")
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.cpu_smoke:
        DEV[0], DTYPE[0] = "cpu", torch.float32
        dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    else:
        torch.cuda.set_device(local_rank)
        # long timeout: other ranks wait in a collective while rank 0 times the single-GPU baseline
        dist.init_process_group("nccl", timeout=timedelta(seconds=600), device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    out_path = args.out / "ring.json"
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"meta": {
        "world": world, "gpu": torch.cuda.get_device_name(0) if DEV[0] == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__, "heads": args.heads, "head_dim": args.head_dim, "batch": 1,
        "dtype": str(DTYPE[0]).replace("torch.", ""), "causal": True,
        "timing": "median over reps of max-over-ranks wall time of a synchronised fwd+bwd step",
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                               "PYTORCH_CUDA_ALLOC_CONF")},
        "check_n": args.check_n}, "correctness": [], "rows": []}

    def save():
        if rank == 0:
            out_path.write_text(json.dumps(result, indent=1))

    log(f"world {world}, {result['meta']['gpu']}, torch {torch.__version__}")
    result["correctness"] = correctness(args, world)
    save()
    ok_mechs = {c["mechanism"] for c in result["correctness"] if c["pass"]}
    if args.profile:
        N0 = int(args.seq_lens.split(",")[0])
        result["profile"] = []
        for mech in [m for m in args.profile.split(",") if m]:
            rows = [None] * world
            dist.all_gather_object(rows, profile_step(mech, N0, args, world))
            result["profile"] += rows
            for r in rows:
                log(f"profile {json.dumps(r)}")
            save()
        return 0
    mechs = [m for m in args.mechs.split(",") if m]
    sizes = [int(s) for s in args.seq_lens.split(",")]
    last: dict[str, tuple[int, float]] = {}   # mech -> (N, seconds per step incl. warmup) for the budget

    for N in sizes:
        for mech in ["single"] + mechs:
            reps = args.reps
            if mech in last:
                n0, t0 = last[mech]
                est = t0 * (N / n0) ** 2 * (reps + 1)
            else:
                est = 0.0
            left = args.budget_s - elapsed()
            if est > left:
                row = {"mechanism": mech, "N": N, "world": 1 if mech == "single" else world,
                       "status": f"skipped: ~{est:.0f} s needed, {left:.0f} s left"}
            else:
                row = time_step(mech, N, args, world, reps=reps)
                if mech == "single":
                    row = broadcast_row(row)
                if "time_ms" in row:
                    last[mech] = (N, row["time_ms"] / 1e3)
                if mech != "single" and mech not in ok_mechs:
                    row["status"] += " (correctness check failed: speed not claimed)"
            result["rows"].append(row)
            log(f"{mech} N={N}: {row.get('time_ms', '-')} ms, peak {row.get('peak_gib', 0):.2f} GiB, {row['status']}")
            save()

    single = {r["N"]: r for r in result["rows"] if r["mechanism"] == "single" and "time_ms" in r}
    acc = {}
    for mech in ("ring-zigzag", "ulysses"):
        sp = [single[r["N"]]["time_ms"] / r["time_ms"] for r in result["rows"]
              if r["mechanism"] == mech and "time_ms" in r and r["N"] in single]
        if sp:
            acc[f"{mech}_min_speedup"] = round(min(sp), 3)
            acc[f"{mech}_speedup>=1.7"] = bool(min(sp) >= 1.7 and mech in ok_mechs)
    if not args.no_reach:
        try:
            result["reach"] = reach(args, world, result["rows"], args.budget_s + 40 - elapsed())
            demo = result["reach"].get("demo", {})
            if "reached" in demo:
                acc["reaches_N_one_gpu_cannot_hold (capped GPUs)"] = demo["reached"]
        except Exception as exc:  # noqa: BLE001
            result["reach"] = {"status": "error: " + repr(exc)[:300]}
            log(traceback.format_exc())
    result["acceptance"] = acc
    result["meta"]["wall_s"] = time.monotonic() - T0
    save()
    dist.barrier()
    if rank == 0:
        print(table(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
