#!/usr/bin/env python3
"""memattn's Triton backend on one GPU (an H200): correctness on the acceptance grid,
determinism, speed against SDPA (flash, cuDNN, efficient) and FlexAttention, memory and
torch.compile, in one run that also tunes the tile configs.

    PYTHONPATH=$PWD python3 scripts/gpu_triton.py --out $OUT     # < 9 minutes on an H200
    PYTHONPATH=$PWD python3 scripts/gpu_triton.py --aot          # no GPU needed: compile every
        kernel variant for sm_90 and print registers / spills per loop (developer check);
        env MEMATTN_AOT_ONLY=0,4 (a subset of the variants), MEMATTN_AOT_SASS=DIR (keep each
        variant's SASS and TTGIR there, e.g. to count LDG.U16 / LDGSTS per loop),
        MEMATTN_AOT_TMA=1, MEMATTN_AOT_NQ=1 (decoding configs), MEMATTN_AOT_SPLITS=3
    PYTHONPATH=$PWD python3 scripts/gpu_triton.py --smoke --out /tmp/s   # no GPU: the control
        flow on the CPU interpreter with tiny sizes (what the test suite runs)
    env MEMATTN_BENCH_SUSTAIN_MS=T: every timed function first runs back to back for T ms, so
        the timing sees the clock the power cap settles at (also gpu_tune.py, which times
        through the same helper); recorded as env.sustain_ms

Output: a compact table on stdout (printed last) and ``$OUT/h200.json`` with the sections
``env, correctness, determinism, dense, sparse, memory, compile, configs, notes``. Units: ms,
TFLOP/s (design.md §5: forward 4·B·H·allowed_pairs·D, backward 2.5x, forward+backward 3.5x),
MiB = 2**20 bytes. Every memattn speed row carries ``checked``: the FlashAttention-rule check
of the exact tile configs it ran with, at a smaller size of the same pattern. Sections run in
priority order under ``--budget`` seconds; rows that do not fit are written with
``status: "skipped: budget"``, exceptions as ``"error: ..."`` and out-of-memory as ``"OOM"``.
``h200.json`` is rewritten after every correctness task and every timed row, so a run killed at
the device's time limit still leaves what it finished (session 15 lost a whole grid that way).

How the time is spent: the correctness grid runs in parallel worker processes (one per head
dim; each compiles its own kernels), while further workers compile the tuning candidates and
FlexAttention's kernels, so the main process finds them in the on-disk caches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTHONUNBUFFERED", "1")
ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SECTIONS = ("correctness", "determinism", "dense", "sparse", "decode", "memory", "compile")
HEAD_DIMS = (32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 256)
SHAPES = ((1, 147), (113, 203), (128, 217), (1023, 1024), (1024, 1023), (2048, 2048))
FAMILIES = ("full", "causal", "sliding_window", "window_per_head", "dilated", "strided_causal", "fixed",
            "exponential", "random", "global_tokens", "longformer", "bigbird", "document", "document_causal",
            "block_sparse", "mask_mod", "union_and")
MiB = 2 ** 20


# ----------------------------------------------------------------------------- arguments
def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: --out DIR, --budget SECONDS, --sections a,b, --workers N, --quick,
    --smoke (CPU interpreter), --aot (compile-only for sm_90), --no-autotune."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for h200.json")
    p.add_argument("--budget", type=float, default=500.0, help="seconds for the whole run (default 500)")
    p.add_argument("--sections", type=_sections, default=list(SECTIONS), help=",".join(SECTIONS))
    p.add_argument("--workers", type=int, default=0, help="correctness processes (0: automatic)")
    p.add_argument("--quick", action="store_true", help="a reduced grid (a few minutes less)")
    p.add_argument("--dims", default="", help="correctness head dims, comma-separated (default: all 11)")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny sizes (no GPU)")
    p.add_argument("--aot", action="store_true", help="compile for sm_90 without a GPU; registers/spills")
    p.add_argument("--no-autotune", action="store_true", help="use the default tile configs")
    p.add_argument("--check-bwd", default="two_pass",
                   help="backward strategies the correctness grid runs under, comma-separated among "
                        "two_pass,atomic,stored_ds (launch.set_backward), each optionally limited to head dims: "
                        "'two_pass,atomic:64/128'")
    p.add_argument("--bwd-variants", default="",
                   help="extra memattn timing rows, comma-separated: MODE or MODE@MEMORY (dq_memory, or "
                        "ds_memory for stored_ds), e.g. 'two_pass,atomic,atomic@1,stored_ds' (rows "
                        "memattn[two_pass] ...)")
    a = p.parse_args(argv)
    if not a.aot and not a.out:
        p.error("--out is required (except with --aot)")
    if a.budget <= 0:
        p.error("--budget must be positive")
    return a


# ----------------------------------------------------------------------------- small helpers
def flops(B: int, H: int, pairs: float, D: int, mult: float = 1.0) -> float:
    """design.md §5: forward 4·B·H·pairs·D (mult 2.5 backward, 3.5 forward+backward)."""
    return 4.0 * B * H * pairs * D * mult


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    """Wall-clock budget with cumulative section deadlines (fractions of the total)."""

    def __init__(self, total: float):
        self.t0 = time.time()
        self.total = total

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()

    def until(self, frac: float) -> float:
        return self.t0 + self.total * frac


def _err_text(e: BaseException) -> str:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    text = str(e)            # head and tail: a compiler error's cause is at its end
    if len(text) > 1800:
        text = text[:300] + " ... " + text[-1500:]
    return f"error: {type(e).__name__}: {text}"


def _fa_check():
    """The shared FlashAttention rule (tests/_errors.py), or a local copy of it."""
    try:
        from _errors import check_close
        return check_close
    except Exception:  # pragma: no cover - the copy is the same rule
        import torch

        def check_close(out, ref, oracle, mult=2.0, name="out"):
            o, r, x = (t.detach().to(torch.float64) for t in (out, ref, oracle))
            fin = torch.isfinite(x)
            if torch.isnan(o).any() or not torch.equal(o[~fin], x[~fin]):
                raise AssertionError(f"{name}: NaN or infinities differ")
            err = float((o - x)[fin].abs().max()) if fin.any() else 0.0
            ref_err = float((r - x)[fin].abs().max()) if fin.any() else 0.0
            rr = ref.detach()[fin]
            atol = 2.0 * float((rr + 0.3 - 0.3 - rr).abs().max()) if rr.numel() else 0.0
            if not err <= mult * ref_err + atol:
                raise AssertionError(f"{name}: {err:.3e} > {mult} x {ref_err:.3e} + {atol:.3e}")
            return {"err": err, "ref_err": ref_err, "atol": atol, "bound": mult * ref_err + atol}
        return check_close


# ----------------------------------------------------------------------------- patterns
def make_pattern(family: str, nq: int, nk: int, H: int):
    """The pattern of one acceptance family for an (nq, nk) problem with H query heads."""
    import torch
    from memattn import patterns as P

    if family == "full":
        return None
    if family == "causal":
        return P.causal()
    if family == "sliding_window":
        return P.sliding_window(256)
    if family == "window_per_head":
        lefts = tuple(16 * 4 ** (h % 4) for h in range(H))
        rights = tuple((0, 8, 0, 50)[h % 4] for h in range(H))
        return P.sliding_window(lefts, rights)
    if family == "dilated":
        return P.dilated(256, 3)
    if family == "strided_causal":
        return P.strided(7, 13, local=8) & P.causal()
    if family == "fixed":
        return P.fixed(64, 8)
    if family == "exponential":
        return P.exponential(local=8)
    if family == "random":
        return P.random(24, seed=1)
    if family == "global_tokens":
        return P.global_tokens([0, 7, 100])
    if family == "longformer":
        return P.longformer(128, [0, 3, 100])
    if family == "bigbird":
        return P.bigbird()
    if family in ("document", "document_causal"):
        cuts = sorted({max(1, min(nk - 1, int(nk * f))) for f in (0.2, 0.45, 0.7)} | {0, nk}) if nk > 3 else [0, nk]
        lengths = [b - a for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        doc = P.document(lengths)
        return doc & P.causal() if family == "document_causal" else doc
    if family == "block_sparse":
        nb = -(-max(nq, nk) // 64) + 1
        g = torch.Generator().manual_seed(nb)
        lay = (torch.rand(nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
        return P.block_sparse(lay, 64)
    if family == "mask_mod":
        return P.from_mask_mod(_mask_mod_fn)
    if family == "union_and":
        return (P.random(8, seed=2) | P.sliding_window(16)) & P.causal()
    raise ValueError(f"unknown family {family!r}")


def _mask_mod_fn(b, h, q, k):
    return ((q + 2 * k) % 5 != 0) & (k <= q + 3)


def _path_group(family: str) -> str:
    """Families that launch the same kernel variants (parametric, documents, block map)."""
    if family.startswith("document"):
        return "docs"
    if family in ("full", "causal", "sliding_window", "window_per_head"):
        return "param"
    return family


def correctness_cases(quick: bool = False, smoke: bool = False, dims: tuple[int, ...] = ()) -> list[dict]:
    """The grid: every head dim (or ``dims``) x (nq, nk) x family (quick: fewer families per shape)."""
    if smoke:
        dims, shapes, fams = dims or (32, 40), ((1, 37), (20, 33)), ("full", "causal", "document_causal", "bigbird")
    else:
        dims, shapes, fams = dims or HEAD_DIMS, SHAPES, FAMILIES
    rows = []
    for d in dims:
        for i, (nq, nk) in enumerate(shapes):
            for j, fam in enumerate(fams):
                if quick and (i + j) % 3:
                    continue
                rows.append({"family": fam, "nq": nq, "nk": nk, "d": d, "layout": "bnhd" if (i + j) % 3 == 1 else "bhnd"})
    return rows


# ----------------------------------------------------------------------------- one check
def check_one(case: dict, dev: str, dtype, H: int = 4, Hkv: int = 2, B: int = 1, configs: dict | None = None,
              pattern=None, softcap: float = 0.0, dropout_p: float = 0.0) -> dict:
    """memattn (triton) vs the reference (same dtype) and the float64 oracle: FA rule on out,
    lse, dq, dk, dv. Returns the case with ``ok``, ``errs`` {name: [err, bound]}, ``path``."""
    import torch
    import memattn
    from memattn.backends.triton import launch

    check_close = _fa_check()
    row = dict(case)
    t0 = time.time()
    try:
        nq, nk, d = case["nq"], case["nk"], case["d"]
        pat = pattern if pattern is not None or "family" not in case else make_pattern(case["family"], nq, nk, H)
        g = torch.Generator(device="cpu").manual_seed(nq * 7 + nk * 13 + d)

        def t(h, n, dd):
            if case.get("layout") == "bnhd":
                return torch.randn(B, n, h, dd, generator=g).to(dev, dtype).transpose(1, 2)
            return torch.randn(B, h, n, dd, generator=g).to(dev, dtype)

        q, k, v = t(H, nq, d), t(Hkv, nk, d), t(Hkv, nk, d)
        do = torch.randn(B, H, nq, d, generator=g).to(dev, dtype)
        res = []

        def call(backend, qq, kk, vv, dd):
            out, lse = memattn.attention(qq, kk, vv, pattern=pat, softcap=softcap, dropout_p=dropout_p,
                                         backend=backend, return_lse=True)
            return out, lse, torch.autograd.grad(out, (qq, kk, vv), dd)

        # One override scope for both triton calls (entering one expires cached plans): the
        # first call, on other values and with another dropout seed, builds the cached plan
        # and its direct launchers; the checked call then goes through them.
        # (a stored-dS dQ launch, "dqds", runs on the dK/dV pass's tiles: not a config of its own)
        configs = {k_: v_ for k_, v_ in (configs or {}).items() if k_ != "dqds"}
        with launch.override_configs(**configs) if configs else contextlib.nullcontext():
            call("triton", *(torch.randn_like(x).requires_grad_(True) for x in (q, k, v)), torch.randn_like(do))
            for backend, dt in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
                qq, kk, vv = (x.detach().to(dt).requires_grad_(True) for x in (q, k, v))
                before = launch.launch_counts()
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(7)
                    out, lse, grads = call(backend, qq, kk, vv, do.to(dt))
                if backend == "triton":   # which launcher the checked call used
                    after = launch.launch_counts()
                    row["launches"] = {k_: after[k_] - before[k_] for k_ in after}
                res.append((out.detach(), lse.detach(), *grads))
                if backend == "triton":
                    row["configs"] = {k_: list(v_.__dict__.values()) for k_, v_ in launch.last_configs().items()}
        errs, ok = {}, True
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            try:
                extra = {}
                if name == "lse":
                    try:
                        from _errors import lse_floor
                        extra = {"min_atol": lse_floor(res[2][i])}
                    except ImportError:  # pragma: no cover
                        pass
                r = check_close(res[0][i], res[1][i], res[2][i], mult=2.0 if i < 2 else 3.0, name=name, **extra)
                errs[name] = [r["err"], r["bound"]]
            except AssertionError as e:
                ok = False
                errs[name] = str(e)[:200]
        row.update(ok=ok, errs=errs, status="ok" if ok else "FAIL")
    except Exception as e:  # one failing case must not stop the grid
        row.update(ok=False, status=_err_text(e), trace=traceback.format_exc()[-800:])
    row["seconds"] = round(time.time() - t0, 3)
    return row


# ----------------------------------------------------------------------------- workers
def _worker_init(smoke: bool) -> None:
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"


def _task(task: tuple) -> list[dict]:
    """Run in a worker process: ("correct", cases) | ("warm", D, kind) | ("flexwarm",)."""
    kind = task[0]
    try:
        import torch

        torch.set_num_threads(2)            # many workers share the host's cores

        smoke = os.environ.get("TRITON_INTERPRET") == "1"
        dev = "cpu" if smoke else "cuda"
        dtype = torch.float32 if smoke else torch.bfloat16
        if kind == "correct":
            from memattn.backends.triton import launch

            mode = task[2] if len(task) > 2 else None
            with launch.using_backward(mode):
                return [dict(check_one(c, dev, dtype), bwd=mode) for c in task[1]]
        if kind == "warm":
            return _warm(task[1], task[2], dev, dtype)
        if kind == "flexwarm":
            return _flex_warm(task[1])
    except Exception as e:
        return [{"task": str(task[:3])[:100], "status": _err_text(e), "trace": traceback.format_exc()[-800:]}]
    return []


def _warm(D: int, path: str, dev: str, dtype) -> list[dict]:
    """Compile (by running once, small) every tuning candidate of one kernel path."""
    import torch
    import memattn
    from memattn import patterns as P
    from memattn.backends.triton import launch

    from memattn.backends.triton.function import attention as attn, mask_args

    pat = {"param": P.causal(), "docs": P.document([256, 256]) & P.causal(),
           "map128": P.longformer(128, [0]), "map64": P.bigbird()}[path]
    blocks = {"map128": ((128, 128),), "map64": ((64, 64),)}.get(path)
    N = 512
    q, k, v = (torch.randn(1, 2, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    spec = memattn.backends.triton.describe_mask(pat, q, k, **({"map_blocks": blocks} if blocks else {}))
    mb = spec.map_block if spec.path == "map" else None
    cands = {kk: launch.candidates(kk, dtype, D, "cuda", mb) for kk in ("fwd", "dkdv", "dq")}
    out = []
    for i in range(max(len(c) for c in cands.values())):
        cfg = {kk: c[min(i, len(c) - 1)] for kk, c in cands.items()}
        t0 = time.time()
        try:
            with launch.override_configs(**cfg):
                o, _ = attn(q, k, v, mask_args(spec), scale=D ** -0.5)
                o.backward(torch.ones_like(o))
            torch.cuda.synchronize() if dev == "cuda" else None
            out.append({"warm": f"D={D} {path} #{i}", "seconds": round(time.time() - t0, 2), "status": "ok"})
        except Exception as e:
            out.append({"warm": f"D={D} {path} #{i}", "status": _err_text(e)})
    return out


# ----------------------------------------------------------------------------- FlexAttention
def flex_setup(kind: str, N: int, H: int, D: int, dev: str):
    """(mask_mod or None, pattern) of one timing case, the same mask for both libraries."""
    import torch
    from memattn import patterns as P

    if kind == "full":
        return None, None
    if kind == "causal":
        return (lambda b, h, q, k: q >= k), P.causal()
    if kind == "window1024":
        return (lambda b, h, q, k: (q >= k) & (q - k <= 1024)), P.sliding_window(1024)
    if kind == "documents16_causal":
        doc = torch.arange(N, device=dev) // (N // 16)
        return (lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k)), P.document([N // 16] * 16) & P.causal()
    if kind == "bigbird":
        pat = P.bigbird().for_sizes(N, N)
        nb = -(-N // 64)
        pos = torch.arange(nb, dtype=torch.int64) * 64
        lay = pat.mask(torch.tensor(0), torch.tensor(0), pos[:, None], pos[None, :]).to(dev)
        return (lambda b, h, q, k: lay[q // 64, k // 64]), pat
    if kind == "longformer":
        return (lambda b, h, q, k: ((q - k).abs() <= 256) | (q < 16) | (k < 16)), P.longformer(512, list(range(16)))
    raise ValueError(kind)


def allowed_pairs(kind: str, N: int, mod, dev: str) -> float:
    """Allowed (query, key) pairs of one head: closed forms, else counted on the device by
    evaluating the mask_mod in row chunks (never an N x N array)."""
    import torch

    if kind == "full":
        return float(N * N)
    if kind == "causal":
        return N * (N + 1) / 2
    if kind == "window1024":
        w = min(1024, N - 1)
        return float((w + 1) * N - w * (w + 1) // 2)
    if kind == "documents16_causal":
        L = N // 16
        return 16 * L * (L + 1) / 2
    total = 0
    kp = torch.arange(N, device=dev)
    step = max(1, (1 << 27) // N)
    for r0 in range(0, N, step):
        qp = torch.arange(r0, min(N, r0 + step), device=dev)
        total += int(mod(0, 0, qp[:, None], kp[None, :]).sum())
    return float(total)


def _flex_fns(kind: str, q, k, v, do, N: int, dev: str):
    """(fwd, fwd+bwd, block-mask build seconds) for FlexAttention on this case."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _FLEX
    if _FLEX is None:
        # One static compile per shape and mask, as a user with fixed shapes gets it: with the
        # default (automatic dynamic shapes after a second shape) Flex ran 15-20% below the
        # anchors, and past the recompile limit it fell back to eager (N x N scores, OOM).
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    mod, _ = flex_setup(kind, N, q.shape[1], q.shape[3], dev)
    build = {}
    bm = None
    if mod is not None:
        t0 = time.time()
        bm = create_block_mask(mod, None, None, N, N, device=dev, _compile=True)
        torch.cuda.synchronize()
        build["first_s"] = time.time() - t0
        t0 = time.time()
        bm = create_block_mask(mod, None, None, N, N, device=dev, _compile=True)
        torch.cuda.synchronize()
        build["steady_s"] = time.time() - t0
    f = lambda: _FLEX(q, k, v, block_mask=bm)  # noqa: E731

    def fb():
        f().backward(do)
    return f, fb, build


_FLEX = None


def _flex_warm(cases: list) -> list[dict]:
    """Compile FlexAttention for the timing cases (fills Inductor's on-disk caches)."""
    import torch

    out = []
    for (kind, B, H, N, D) in cases:
        t0 = time.time()
        try:
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            f, fb, _ = _flex_fns(kind, q, k, v, do, N, "cuda")
            f()
            fb()
            torch.cuda.synchronize()
            out.append({"flexwarm": f"{kind} N={N} D={D}", "seconds": round(time.time() - t0, 1), "status": "ok"})
            del q, k, v, do
        except Exception as e:
            out.append({"flexwarm": f"{kind} N={N} D={D}", "status": _err_text(e)})
    return out


def dense_cases(smoke: bool) -> list[tuple]:
    if smoke:
        return [(kind, 1, 2, 64, 32) for kind in ("full", "causal")]
    ns = [int(n) for n in os.environ.get("MEMATTN_DENSE_N", "1024,4096,16384").split(",")]   # e.g. "1024"
    return [(kind, 16384 // N, 2048 // D, N, D) for D in (128, 64) for N in ns for kind in ("full", "causal")]


def sparse_cases(smoke: bool) -> list[tuple]:
    if smoke:
        return [("window1024", 1, 2, 128, 32), ("bigbird", 1, 2, 128, 32)]
    cases = [("window1024", 1, 16, 16384, 128), ("window1024", 1, 16, 65536, 128), ("window1024", 1, 16, 131072, 128),
             ("documents16_causal", 1, 16, 65536, 128), ("bigbird", 1, 16, 65536, 128),
             ("longformer", 1, 16, 65536, 128)]
    only = os.environ.get("MEMATTN_SPARSE_ONLY")     # e.g. "window1024,documents16_causal"
    return [c for c in cases if c[0] in only.split(",")] if only else cases


# ----------------------------------------------------------------------------- timing
def _sustain(fn, ms: float, grad_to_none=None) -> int:
    """Run ``fn`` back to back for about ``ms`` milliseconds of wall time (gradients reset as
    do_bench resets them), then synchronise; returns the number of calls. Used before timing
    when MEMATTN_BENCH_SUSTAIN_MS is set: do_bench alone times 50 ms windows, shorter than
    the H200's power cap takes to pull the clock down (NOTES, session 7 call 8: 1760 MHz under
    memattn's kernels, 1895 under Flex's, in 2 s runs), so a sustained load is its own case."""
    import torch

    n, t0 = 0, time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < ms:
        for t in grad_to_none or ():
            t.grad = None
        fn()
        n += 1
        if n % 8 == 0 and torch.cuda.is_available():
            torch.cuda.synchronize()          # keep the host within a few calls of the device
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n


def _bench(fn, smoke: bool, grad_to_none=None) -> float:
    """Median milliseconds (do_bench: 10 ms warm-up, 40 ms of calls, L2 flushed before each).
    With MEMATTN_BENCH_SUSTAIN_MS=T, ``fn`` first runs back to back for T ms (see _sustain)."""
    if smoke:
        _sustain(fn, float(os.environ.get("MEMATTN_BENCH_SUSTAIN_MS", "0")), grad_to_none)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[1]
    from triton.testing import do_bench

    _sustain(fn, float(os.environ.get("MEMATTN_BENCH_SUSTAIN_MS", "0")), grad_to_none)
    return float(do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median"))


def _host_ms(fn, calls: int = 30, grad_to_none=None) -> float | None:
    """Host milliseconds per call of ``fn`` (MEMATTN_BENCH_HOST=1): the device is held by a
    sleep kernel while ``calls`` calls are enqueued, so the wall time is the Python and launch
    work alone (as scripts/gpu_host.py measures it). When it is near the device time, do_bench
    can end up timing the host: the 1k causal forward+backward rows (NOTES, session 10)."""
    import torch

    if not torch.cuda.is_available():
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e8))               # ~0.15 s of device time at the H200's clock
    t0 = time.perf_counter()
    for _ in range(calls):
        for t in grad_to_none or ():
            t.grad = None
        fn()
    dt = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    return dt


_CHECKED: dict = {}


def _config_check(kind: str, D: int, cfgs: dict, dev: str, dtype, smoke: bool, N: int = 2048) -> str:
    """FA-rule check of the exact tile configs a timing row used, on a problem of the same
    pattern family and at most 4096 tokens: the row's N up to that, so that length-dependent
    launch choices (the grouped dK/dV order above 2048) match the timed kernels. Cached per
    (kind, D, configs, size)."""
    from memattn.backends.triton import launch

    n = 128 if smoke else min(N, 4096)
    key = (kind, D, n, tuple(sorted((k, tuple(v.__dict__.values())) for k, v in cfgs.items())),
           tuple(sorted(launch._BWD.items())))
    if key not in _CHECKED:
        _, pat = flex_setup(kind, n, 4, D, dev)
        row = check_one({"nq": n, "nk": n, "d": D}, dev, dtype, H=4, Hkv=4, configs=cfgs, pattern=pat)
        _CHECKED[key] = row.get("status", "?")
    return _CHECKED[key]


def _variant(text: str) -> tuple[str, float | None]:
    """"atomic@1" -> ("atomic", 1.0); "two_pass" -> ("two_pass", None)."""
    mode, _, mem = text.partition("@")
    return mode, (float(mem) if mem else None)


def _backward_scope(mode: str | None, mem: float | None):
    """launch.using_backward for a variant: MEM caps the atomic accumulator (dq_memory) or
    the stored-dS scratch (ds_memory)."""
    from memattn.backends.triton import launch

    if mode == "stored_ds":
        return launch.using_backward(mode, ds_memory=mem)
    return launch.using_backward(mode, mem)


def time_case(kind: str, B: int, H: int, N: int, D: int, dev: str, dtype, smoke: bool, peers: bool = True,
              variants: tuple[str, ...] = ()) -> list[dict]:
    """Rows for memattn and the peers on one (pattern, shape): ms and TFLOP/s, fwd and fwd+bwd."""
    import torch
    import torch.nn.functional as F
    import memattn
    from memattn.backends.triton import launch, masks

    rows = []
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    mod, pat = flex_setup(kind, N, H, D, dev)
    pairs = allowed_pairs(kind, N, mod, dev)
    base = {"kind": kind, "B": B, "H": H, "N": N, "D": D, "pairs": pairs}

    # memattn: build the mask description cold (block map + bits), then time.
    from memattn.patterns import base as pbase

    masks.clear_cache()
    if hasattr(pbase, "_cached_block_map"):
        pbase._cached_block_map.cache_clear()
    t0 = time.time()
    spec = memattn.backends.triton.describe_mask(pat, q, k)
    if dev == "cuda":
        torch.cuda.synchronize()
    build_s = time.time() - t0
    impls = {"memattn": lambda: memattn.attention(q, k, v, pattern=pat, backend="triton")}
    for var in variants:                     # the same call under another backward strategy
        impls[f"memattn[{var}]"] = impls["memattn"]
    if peers and not smoke:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if kind in ("full", "causal"):
            for nm, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                           ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
                def f(be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
                impls[nm] = f
        impls["flex"] = None
    for name, f in impls.items():
        row = dict(base, impl=name)
        mode, mem = _variant(name[8:-1]) if name.startswith("memattn[") else (None, None)
        scope = _backward_scope(mode, mem)
        scope.__enter__()
        try:
            if name == "flex":
                f, fb, build = _flex_fns(kind, q, k, v, do, N, dev)
                row["mask_build"] = build
            else:
                def fb(f=f):
                    f().backward(do)
            f()                                 # compile / autotune outside the timing
            fb()
            row["fwd_ms"] = _bench(f, smoke)
            cfg_fwd = launch.last_configs().get("fwd") if name.startswith("memattn") else None
            row["fwdbwd_ms"] = _bench(fb, smoke, grad_to_none=[q, k, v])
            if os.environ.get("MEMATTN_BENCH_HOST") == "1" and not smoke:
                row["host_ms"] = {"fwd": _host_ms(f), "fwdbwd": _host_ms(fb, grad_to_none=[q, k, v])}
            row["fwd_tflops"] = flops(B, H, pairs, D) / row["fwd_ms"] / 1e9
            row["fwdbwd_tflops"] = flops(B, H, pairs, D, 3.5) / row["fwdbwd_ms"] / 1e9
            row["status"] = "ok"
            if name.startswith("memattn"):
                for k_ in ("dq", "dkdv", "dqds"):
                    launch._LAST.pop(k_, None)
                f().backward(do)            # the configs of this strategy's backward
                cfgs = dict(launch.last_configs(), fwd=cfg_fwd)
                row["bwd"] = {"mode": mode, "memory": mem, "two_pass": "dq" in cfgs, "stored_ds": "dqds" in cfgs}
                row["configs"] = {k_: list(v_.__dict__.values()) for k_, v_ in cfgs.items()}
                row["path"] = spec.path
                row["mask_build"] = {"first_s": build_s, "bytes": spec.nbytes(),
                                     "info": _jsonable({k_: v_ for k_, v_ in spec.info.items() if not k_.startswith("_")})}
                row["checked"] = _config_check(kind, D, cfgs, dev, dtype, smoke, N)
        except Exception as e:
            row["status"] = _err_text(e)
            row["trace"] = traceback.format_exc()[-600:]
        finally:
            scope.__exit__(None, None, None)
        rows.append(row)
        if dev == "cuda":
            torch.cuda.empty_cache()
    # cross-check memattn against FlexAttention on the full problem (informative)
    return rows


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)


# ----------------------------------------------------------------------------- decoding
def decode_cases(smoke: bool) -> list[tuple]:
    """(B, H, Hkv, N, D): one query per sequence against N cached keys; B = 1 is the case that
    splits its keys over several programs."""
    if smoke:
        return [(1, 2, 2, 256, 32)]
    return [(B, 32, Hkv, N, 128) for B in (1, 8) for Hkv in (32, 8) for N in (8192, 65536)]


def decode_case(B: int, H: int, Hkv: int, N: int, D: int, dev: str, dtype, smoke: bool) -> list[dict]:
    """memattn vs SDPA cuDNN and flash (MHA only; SDPA takes no GQA here) on one decoding step:
    an FA-rule check of memattn's output against the float64 oracle first, then the median
    time and the K/V bytes read per second (TB/s)."""
    import torch
    import torch.nn.functional as F
    import memattn
    from memattn.backends.triton import launch

    g = torch.Generator(device="cpu").manual_seed(N + B)
    q = torch.randn(B, H, 1, D, generator=g).to(dev, dtype)
    k, v = (torch.randn(B, Hkv, N, D, generator=g).to(dev, dtype) for _ in range(2))
    kv_bytes = 2 * k.numel() * k.element_size()
    base = {"B": B, "H": H, "Hkv": Hkv, "N": N, "D": D,
            "splits": launch.kv_splits(B * H, -(-N // 64), q.device) if dev == "cuda" else 1}
    impls = {"memattn": lambda: memattn.attention(q, k, v, backend="triton")}
    if not smoke and Hkv == H:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for nm, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def f(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v)
            impls[nm] = f
    rows = []
    check_close = _fa_check()
    for name, f in impls.items():
        row = dict(base, impl=name)
        try:
            out = f()
            if name == "memattn":
                rep = H // Hkv
                kk, vv = (t.repeat_interleave(rep, dim=1) for t in (k, v))
                refs = [F.scaled_dot_product_attention(q.to(dt), kk.to(dt), vv.to(dt))
                        for dt in (torch.float32, torch.float64)]
                r = check_close(out, refs[0].to(dtype), refs[1], mult=2.0, name="decode out")
                row["check"] = {"err": r["err"], "bound": r["bound"]}
            row["ms"] = _bench(f, smoke)
            row["tbps"] = kv_bytes / (row["ms"] * 1e-3) / 1e12
            row["status"] = "ok"
        except Exception as e:  # recorded, the run goes on
            row["status"] = _err_text(e)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- memory
def memory_case(name: str, B: int, H: int, N: int, D: int, pattern_kind: str, dev: str, dtype, smoke: bool,
                spot_rows: int = 64) -> dict:
    """Peak memory beyond inputs/outputs/grads of one fwd+bwd, its time, and an FA-rule spot
    check of the last ``spot_rows`` query rows against a float64 oracle on those rows."""
    import torch
    import memattn

    row = {"case": name, "B": B, "H": H, "N": N, "D": D, "pattern": pattern_kind}
    try:
        _, pat = flex_setup(pattern_kind, N, H, D, dev)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        nbytes = q.numel() * q.element_size()
        base = torch.cuda.memory_allocated() if dev == "cuda" else 0
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out, lse = memattn.attention(q, k, v, pattern=pat, backend="triton", return_lse=True)
        out.backward(do)
        if dev == "cuda":
            torch.cuda.synchronize()
        row["seconds"] = round(time.time() - t0, 3)
        io = out.numel() * out.element_size() + lse.numel() * 4 + 3 * nbytes      # out, lse, dq, dk, dv
        if dev == "cuda":
            peak = torch.cuda.max_memory_allocated()
            extra = peak - base - io
            row.update(peak_MiB=peak / MiB, extra_MiB=extra / MiB,
                       extra_pct_of_io=100.0 * extra / (4 * nbytes + io))   # inputs q, k, v, dout + io
        row["finite"] = bool(torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v)))
        row["spot_check"] = _spot_check(q, k, v, out, pat, pattern_kind, spot_rows)
        row["status"] = "ok" if row["finite"] and row["spot_check"].get("ok") else "FAIL"
        del q, k, v, do, out, lse
    except Exception as e:
        row["status"] = _err_text(e)
        row["trace"] = traceback.format_exc()[-600:]
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def _spot_check(q, k, v, out, pat, kind: str, rows: int) -> dict:
    """FA rule on the last ``rows`` queries: reference in q's dtype (fp32 maths) and float64."""
    import torch

    check_close = _fa_check()
    B, H, N, D = q.shape
    k_lo = max(0, N - rows - 1024) if kind == "window1024" else 0      # keys before k_lo are not allowed
    qs = q.detach()[:, :, N - rows:]
    ks, vs = k.detach()[:, :, k_lo:], v.detach()[:, :, k_lo:]
    qpos = torch.arange(N - rows, N)[:, None]
    kpos = torch.arange(k_lo, N)[None, :]
    p = pat.for_sizes(N, N) if pat is not None else None
    allowed = (torch.ones(rows, N - k_lo, dtype=torch.bool) if p is None else
               torch.broadcast_to(p.mask(torch.tensor(0), torch.tensor(0), qpos, kpos), (rows, N - k_lo)))
    allowed = allowed.to(q.device)
    res = {}
    for dt in (torch.float32, torch.float64):
        outs = []
        for h in range(H):                                      # one head at a time: bounded memory
            s = (qs[:, h].to(dt) @ ks[:, h].to(dt).transpose(-1, -2)) * D ** -0.5
            s = s.masked_fill(~allowed, float("-inf"))
            outs.append(torch.softmax(s, -1) @ vs[:, h].to(dt))
        res[dt] = torch.stack(outs, 1)
    same = res[torch.float32].to(q.dtype)
    try:
        r = check_close(out.detach()[:, :, N - rows:], same, res[torch.float64], mult=2.0, name="out rows")
        return {"ok": True, "err": r["err"], "bound": r["bound"]}
    except AssertionError as e:
        return {"ok": False, "error": str(e)[:200]}


# ----------------------------------------------------------------------------- compile
def compile_check(dev: str, dtype, smoke: bool) -> dict:
    """A small transformer block calling memattn.attention: graph breaks (explain), output
    and gradients of torch.compile against eager."""
    import torch
    import torch.nn as nn
    import memattn

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.h = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.h, C // self.h).unbind(2)
            o = memattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                  backend="triton")
            return self.proj(o.transpose(1, 2).reshape(B, N, C))

    row = {}
    try:
        dim, heads, N = (64, 2, 48) if smoke else (1024, 8, 2048)
        torch.manual_seed(0)
        model = Block(dim, heads).to(dev, dtype)
        x = torch.randn(2, N, dim, device=dev, dtype=dtype)
        eager = model(x)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(model)(x)
        row.update(graph_breaks=ex.graph_break_count, graphs=ex.graph_count,
                   break_reasons=[str(r.reason)[:200] for r in ex.break_reasons])
        torch._dynamo.reset()
        comp = torch.compile(model, backend="eager" if smoke else "inductor")
        y = comp(x)
        row["max_abs_diff"] = float((y.detach().float() - eager.detach().float()).abs().max())
        y.float().square().mean().backward()
        g_c = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        eager.float().square().mean().backward()
        row["grad_max_abs_diff"] = max(float((a.float() - p.grad.float()).abs().max())
                                       for a, p in zip(g_c, model.parameters()))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        row["status"] = "ok" if (row["graph_breaks"] == 0 and row["max_abs_diff"] <= tol) else "FAIL"
    except Exception as e:
        row["status"] = _err_text(e)
        row["trace"] = traceback.format_exc()[-800:]
    return row


# ----------------------------------------------------------------------------- determinism
def determinism_check(dev: str, dtype, smoke: bool) -> list[dict]:
    import torch
    import memattn
    from memattn import patterns as P

    from memattn.backends.triton import launch

    # deterministic mode as a user asks for it: torch.use_deterministic_algorithms (the
    # Triton backward then takes its two-pass form, no atomics)
    rows = []
    N, D = (64, 32) if smoke else (2048, 128)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    for name, pat in (("causal", P.causal()), ("bigbird_causal_gqa", P.bigbird(block_size=16 if smoke else 64) & P.causal())):
        try:
            launch._LAST.clear()
            torch.manual_seed(3)
            q = torch.randn(2, 8, N, D, device=dev, dtype=dtype)
            k, v = (torch.randn(2, 2, N, D, device=dev, dtype=dtype) for _ in range(2))
            do = torch.randn_like(q)
            got = []
            for _ in range(2):
                qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
                o = memattn.attention(qq, kk, vv, pattern=pat, backend="triton")
                got.append((o.detach(), *torch.autograd.grad(o, (qq, kk, vv), do)))
            same = all(torch.equal(a, b) for a, b in zip(*got))
            rows.append({"case": name, "bit_identical": same, "status": "ok" if same else "FAIL",
                         "two_pass": "dq" in launch.last_configs()})
        except Exception as e:
            rows.append({"case": name, "status": _err_text(e)})
    torch.use_deterministic_algorithms(prev)
    rows += direct_launch_check(dev, dtype, smoke)
    return rows


def _all_plans(objs):
    """The launch plans (plans._Plan) inside cached entries: plans, tuples, the backward's plans."""
    from memattn.backends.triton import plans

    for o in objs:
        if isinstance(o, plans._Plan):
            yield o
        elif isinstance(o, tuple):
            yield from _all_plans(o)
        elif hasattr(o, "kv"):           # launch._BwdPlans
            yield from _all_plans((o.pre, *o.kv, o.q, *o.ds))


def direct_launch_check(dev: str, dtype, smoke: bool) -> list[dict]:
    """The direct launcher's raw launches (plans._RawLaunch: the C launcher called directly,
    TMA descriptors expanded and cached by memattn) against Triton's CudaLauncher:
    forward+backward at 1k causal with the dQ launch on its TMA tile (forced, whatever an
    autotuner would pick), three calls each way, the first two on tensors kept alive (new
    addresses, new maps), the third after they are freed (addresses reused, cached maps);
    every result must be bit-identical to the first call through Triton's launcher, and on
    the GPU some raw launcher must have expanded descriptors."""
    import contextlib

    import torch
    import memattn
    from memattn import patterns as P

    from memattn.backends.triton import launch, plans

    rows = []
    N = 64 if smoke else 1024
    for D in ((32,) if smoke else (64, 128)):
        row = {"case": f"direct_descs_d{D}"}
        old = plans._RAW[0]
        scope = (contextlib.nullcontext() if smoke
                 else launch.override_configs(dq=launch.TileConfig(128, 64, 8, 3, True)))
        try:
            torch.manual_seed(5)
            q, k, v, do = (torch.randn(4, 8, N, D, device=dev, dtype=dtype) for _ in range(4))
            got, raw_desc = {}, 0
            with scope:
                for raw in (False, True):
                    plans._RAW[0] = raw
                    plans._PLANS.clear()
                    outs, keep = [], []
                    for rep in range(3):
                        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
                        o = memattn.attention(qq, kk, vv, pattern=P.causal(), backend="triton")
                        outs.append((o.detach(), *torch.autograd.grad(o, (qq, kk, vv), do)))
                        if rep < 1:
                            keep.append((qq, kk, vv, o))
                        else:
                            keep.clear()
                    got[raw] = outs
                    if raw:
                        raw_desc = sum(d.raw is not None and len(d.raw.descs) > 0
                                       for p in _all_plans(plans._PLANS.values()) for d in p.direct.values())
            ref = got[False][0]
            same = all(torch.equal(a, b) for outs in got.values() for o in outs for a, b in zip(ref, o))
            row.update(bit_identical=same, raw_launchers_with_descs=raw_desc,
                       status="ok" if same and (smoke or raw_desc > 0) else "FAIL")
        except Exception as e:
            row["status"] = _err_text(e)
        finally:
            plans._RAW[0] = old
            plans._PLANS.clear()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    import torch

    smoke = args.smoke
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import memattn  # noqa: F401
    from memattn.backends.triton import launch

    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    budget = Budget(args.budget)
    res: dict = {"env": {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
                         "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)",
                         "budget_s": args.budget, "sections": args.sections,
                         "sustain_ms": float(os.environ.get("MEMATTN_BENCH_SUSTAIN_MS", "0")),
                         "host_ms": os.environ.get("MEMATTN_BENCH_HOST") == "1"},
                 "notes": []}
    for s in SECTIONS:
        res[s] = []
    if not args.no_autotune and not smoke:
        launch.set_autotune(True)

    # -- correctness (+ compile-ahead workers), in parallel processes
    pool = None
    if "correctness" in args.sections or (not smoke and any(s in args.sections for s in ("dense", "sparse"))):
        dims = tuple(int(x) for x in args.dims.split(",") if x.strip())
        cases = correctness_cases(args.quick, smoke, dims) if "correctness" in args.sections else []
        # one task per (head dim, mask path): cases of one group share compiled variants,
        # and few head dims still spread over the workers
        by_d: dict[tuple, list] = {}
        for c in cases:
            by_d.setdefault((c["d"], _path_group(c["family"])), []).append(c)
        modes = [x.strip().partition(":") for x in args.check_bwd.split(",") if x.strip()]
        tasks: list[tuple] = [("correct", cs, mode) for mode, _, ds in modes for (d, _g), cs in by_d.items()
                              if not ds or str(d) in ds.split("/")]
        if not smoke:
            if "dense" in args.sections or "sparse" in args.sections:
                tasks = [("warm", 128, "param"), ("warm", 64, "param")] + tasks
            if "sparse" in args.sections:
                tasks += [("warm", 128, "docs"), ("warm", 128, "map128"), ("warm", 128, "map64")]
            tasks.insert(0, ("flexwarm", [c for c in dense_cases(False) if "dense" in args.sections]
                             + [c for c in sparse_cases(False) if "sparse" in args.sections]))
        n_workers = args.workers or max(1, min(len(tasks), (os.cpu_count() or 4) - 1, 18 if not smoke else 2))
        log(f"correctness: {len(cases)} cases, backward {args.check_bwd}, {len(by_d)} groups, {len(tasks)} tasks on "
            f"{n_workers} processes")
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(n_workers, initializer=_worker_init, initargs=(smoke,), maxtasksperchild=1)
        pending = [pool.apply_async(_task, (t,)) for t in tasks]
        timing = any(s in args.sections for s in ("dense", "sparse"))
        deadline = budget.until(0.38 if timing else 0.62)     # alone: most of the budget
        for t, p in zip(tasks, pending):
            # Flex's warm-up is waited for up to 90% of the budget: cut at the correctness
            # deadline, its compile restarts in the main process's first timed Flex call
            # (session 10, call 1: 208 s of a 300-s budget, every later sparse row skipped)
            until = budget.until(0.9) if t[0] == "flexwarm" else deadline
            try:
                rows = p.get(timeout=max(1.0, until - time.time()))
            except mp.TimeoutError:
                rows = ([dict(c, status="skipped: budget") for c in t[1]] if t[0] == "correct"
                        else [{"task": str(t)[:80], "status": "skipped: budget"}])
            except Exception as e:
                rows = [{"task": str(t)[:80], "status": _err_text(e)}]
            (res["correctness"] if t[0] == "correct" else res["notes"]).extend(rows)
            save(res, args.out)
        pool.terminate()
        n_ok = sum(1 for r in res["correctness"] if r.get("ok"))
        log(f"correctness: {n_ok}/{len(res['correctness'])} pass ({budget.elapsed():.0f}s)")
        for r in res["correctness"]:
            if not r.get("ok"):
                log(f"  {r.get('status')}: {r.get('family')} nq={r.get('nq')} nk={r.get('nk')} d={r.get('d')} "
                    f"bwd={r.get('bwd')} "
                    f"{r.get('errs', '')}")

    # -- extra semantics (main process): softcap, dropout, GQA strides at one size
    if "correctness" in args.sections and budget.left() > 0.55 * args.budget:
        for extra in (dict(family="causal", softcap=30.0), dict(family="bigbird", softcap=10.0),
                      dict(family="causal", dropout_p=0.2)):
            n = 64 if smoke else 1024
            case = {"family": extra["family"], "nq": n, "nk": n, "d": 32 if smoke else 128, "layout": "bnhd",
                    "extra": {k_: v_ for k_, v_ in extra.items() if k_ != "family"}}
            pat = make_pattern(extra["family"], n, n, 4)
            res["correctness"].append(check_one(case, dev, dtype, pattern=pat, softcap=extra.get("softcap", 0.0),
                                                dropout_p=extra.get("dropout_p", 0.0)))

    if "determinism" in args.sections:
        res["determinism"] = determinism_check(dev, dtype, smoke)
        log(f"determinism: {[r.get('status') for r in res['determinism']]}")
        save(res, args.out)

    variants = tuple(x.strip() for x in args.bwd_variants.split(",") if x.strip())
    # -- dense timing
    if "dense" in args.sections:
        deadline = budget.until(0.62)
        for case in dense_cases(smoke):
            if time.time() > deadline:
                res["dense"].append({"kind": case[0], "N": case[3], "D": case[4], "status": "skipped: budget"})
                continue
            rows = time_case(*case, dev=dev, dtype=dtype, smoke=smoke, variants=variants)
            res["dense"].extend(rows)
            log("dense " + _line(rows))
            save(res, args.out)

    # -- sparse timing
    if "sparse" in args.sections:
        deadline = budget.until(0.80)
        for case in sparse_cases(smoke):
            if time.time() > deadline:
                res["sparse"].append({"kind": case[0], "N": case[3], "status": "skipped: budget"})
                continue
            rows = time_case(*case, dev=dev, dtype=dtype, smoke=smoke, variants=variants)
            res["sparse"].extend(rows)
            log("sparse " + _line(rows))
            save(res, args.out)

    # -- decoding: one query against a KV cache (split-KV when B·H is small)
    if "decode" in args.sections:
        for case in decode_cases(smoke):
            rows = decode_case(*case, dev=dev, dtype=dtype, smoke=smoke)
            res["decode"].extend(rows)
            save(res, args.out)
            log("decode " + " ".join(f"{r['impl']} B={r['B']} N={r['N']} "
                                     f"{r.get('tbps', float('nan')):.2f} TB/s {r.get('status')}" for r in rows))

    # -- memory (64k, 4M window) then compile, then the 1M causal run if it fits. No tuning
    # here: timing candidates would allocate scratch outputs inside the measured peak.
    launch.set_autotune(False)
    if "memory" in args.sections:
        mem = [("causal_64k", 1, 16, 65536, 128, "causal"), ("bigbird_64k", 1, 16, 65536, 128, "bigbird"),
               ("window1024_4M", 1, 8, 4 * 2 ** 20, 128, "window1024")]
        if smoke:
            mem = [("causal_small", 1, 2, 128, 32, "causal")]
        for m in mem:
            if budget.left() < 60:
                res["memory"].append({"case": m[0], "status": "skipped: budget"})
                continue
            r = memory_case(*m, dev=dev, dtype=dtype, smoke=smoke)
            res["memory"].append(r)
            log(f"memory {m[0]}: {r.get('status')} extra={r.get('extra_MiB', 0):.1f} MiB "
                f"({r.get('extra_pct_of_io', 0):.2f}%) {r.get('seconds', '')}s")
            save(res, args.out)
    if "compile" in args.sections:
        if budget.left() > 45:
            res["compile"] = [compile_check(dev, dtype, smoke)]
        else:
            res["compile"] = [{"status": "skipped: budget"}]
        log(f"compile: {res['compile'][0].get('status')} breaks={res['compile'][0].get('graph_breaks')}")
        save(res, args.out)
    if "memory" in args.sections and not smoke:
        # causal fwd+bwd at 1M: estimate its time from the causal 16k rate of this run
        rate = max([r.get("fwdbwd_tflops", 0) for r in res["dense"] if r.get("impl") == "memattn"
                    and r.get("kind") == "causal" and r.get("D") == 128] or [250.0])
        est = flops(1, 16, 2 ** 20 * (2 ** 20 + 1) / 2, 128, 3.5) / (rate * 1e12) + 15
        if budget.left() > est:
            r = memory_case("causal_1M", 1, 16, 2 ** 20, 128, "causal", dev=dev, dtype=dtype, smoke=smoke)
        else:
            r = {"case": "causal_1M", "status": "skipped: budget", "estimated_s": est, "left_s": budget.left()}
        res["memory"].append(r)
        log(f"memory causal_1M: {r.get('status')} {r.get('seconds', '')}s")
    res["configs"] = {str(k): list(v.__dict__.values()) for k, v in launch.tuned_configs().items()}
    res["env"]["seconds"] = budget.elapsed()
    from memattn.backends.triton import launch as _launch_mod
    res["env"]["launch_counts_main_process"] = _launch_mod.launch_counts()
    return res


def _line(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    parts = [f"{r0.get('kind')} N={r0.get('N')} D={r0.get('D')}:"]
    for r in rows:
        if r.get("status") == "ok":
            parts.append(f"{r['impl']} {r['fwd_tflops']:.0f}/{r['fwdbwd_tflops']:.0f}")
        else:
            parts.append(f"{r.get('impl')} {r.get('status', '')[:40]}")
    return " ".join(parts)


def table(res: dict) -> str:
    """The compact summary printed last."""
    lines = ["", "=" * 100, "memattn Triton backend — summary (TFLOP/s fwd / fwd+bwd; 'vs' = peer ms / memattn ms, "
                            "> 1 means memattn is faster)"]
    c = res.get("correctness", [])
    if c:
        bad = [r for r in c if not r.get("ok")]
        lines.append(f"correctness: {len(c) - len(bad)}/{len(c)} pass"
                     + (f"; failing: " + ", ".join(f"{r.get('family')}:{r.get('nq')}x{r.get('nk')}:d{r.get('d')}"
                                                    f"({r.get('status')})" for r in bad[:12]) if bad else ""))
    for r in res.get("determinism", []):
        lines.append(f"determinism {r.get('case')}: {r.get('status')}")
    for sec in ("dense", "sparse"):
        groups: dict = {}
        for r in res.get(sec, []):
            groups.setdefault((r.get("kind"), r.get("N"), r.get("D")), {})[r.get("impl")] = r
        if groups:
            lines.append(f"-- {sec}: kind N D | memattn | flash cudnn eff flex | vs flex, vs flash, vs cudnn | checked")
        for (kind, N, D), g in groups.items():
            m = g.get("memattn", {})

            def tf(r):
                return f"{r['fwd_tflops']:.0f}/{r['fwdbwd_tflops']:.0f}" if r.get("status") == "ok" else \
                    (r.get("status") or "-")[:18]

            def ratio(peer):
                p = g.get(peer, {})
                if m.get("status") != "ok" or p.get("status") != "ok":
                    return "-"
                return f"{p['fwd_ms'] / m['fwd_ms']:.2f}/{p['fwdbwd_ms'] / m['fwdbwd_ms']:.2f}"
            peers = " ".join(tf(g[p]) if p in g else "-" for p in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex"))
            lines.append(f"{kind:18s} {N!s:>7} {D!s:>3} | {tf(m):>9} | {peers} | {ratio('flex')} {ratio('sdpa_flash')} "
                         f"{ratio('sdpa_cudnn')} | {m.get('checked', '-')}")
            for name in (x for x in g if x and x.startswith("memattn[")):   # other backward strategies
                                                                            # (a skipped case has no impl)
                v_ = g[name]
                fl = g.get("flex", {})
                vs = (f"{fl['fwdbwd_ms'] / v_['fwdbwd_ms']:.2f}" if v_.get("status") == "ok"
                      and fl.get("status") == "ok" else "-")
                lines.append(f"{'':18s} {name:>22} {tf(v_):>9} fwd+bwd vs flex {vs} | {v_.get('checked', '-')}")
            if sec == "sparse" and m:
                fb = g.get("flex", {}).get("mask_build", {})
                lines.append(f"{'':18s} mask build: memattn {m.get('mask_build', {}).get('first_s', float('nan')):.3f}s"
                             f" ({m.get('path')}), flex first {fb.get('first_s', float('nan')):.3f}s steady "
                             f"{fb.get('steady_s', float('nan')):.3f}s")
    for r in res.get("decode", []):
        lines.append(f"decode {r.get('impl'):>10} B={r.get('B')} H={r.get('H')} Hkv={r.get('Hkv')} N={r.get('N')} "
                     f"splits={r.get('splits')}: {r.get('ms', float('nan')):.3f} ms, "
                     f"{r.get('tbps', float('nan')):.2f} TB/s {r.get('status')}")
    for r in res.get("memory", []):
        lines.append(f"memory {r.get('case')}: {r.get('status')} peak {r.get('peak_MiB', float('nan')):.0f} MiB, extra "
                     f"{r.get('extra_MiB', float('nan')):.1f} MiB ({r.get('extra_pct_of_io', float('nan')):.2f}% of io),"
                     f" {r.get('seconds', '-')}s, spot {r.get('spot_check', {})}")
    for r in res.get("compile", []):
        lines.append(f"torch.compile: {r.get('status')} graph breaks {r.get('graph_breaks')} graphs {r.get('graphs')} "
                     f"max diff {r.get('max_abs_diff')} grad diff {r.get('grad_max_abs_diff')}")
    lines.append(f"total {res.get('env', {}).get('seconds', 0):.0f}s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- AOT (no GPU)
def use_sm90_target() -> None:
    """Make Triton compile for an sm_90 GPU on a machine without one (compile-only checks:
    ``--aot``, scripts/probe_warp_specialize.py); see memattn.backends.triton.aot."""
    from memattn.backends.triton.aot import use_sm90_target as use

    use()


def aot_check() -> int:
    """Compile every kernel variant for sm_90 on a machine without a GPU; print registers and
    spills (total and per loop, from the SASS). A developer check of the config lists."""
    import glob
    import re
    import subprocess
    import tempfile

    import torch

    use_sm90_target()
    import triton
    from memattn import patterns as P
    from memattn.backends.triton import function, launch, masks

    from memattn.backends.triton.aot import ptxas_info

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = glob.glob(os.path.join(bindir, "cuobjdump"))[0]

    def loops(sass: str) -> list[str]:
        ins = [(int(m.group(1), 16), m.group(2)) for m in
               (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", ln) for ln in sass.splitlines()) if m]
        out = []
        for addr, txt in ins:
            m = re.search(r"BRA\s+0x([0-9a-f]+)", txt)
            if m and int(m.group(1), 16) < addr:
                body = [x for a, x in ins if int(m.group(1), 16) <= a <= addr]
                ops = ("HGMMA", "LDGSTS", "LDG.E", "UTMALDG", "BAR.SYNC", "LDL", "STL")   # async copies, syncs
                out.append("loop: " + " ".join(f"{k}={sum(k in x for x in body)}" for k in ops))
        return out

    def hook(kernel, grid, kw):
        ck = kernel.warmup(grid=grid, **kw)
        info = ptxas_info(ck.asm["ptx"])
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        if os.environ.get("MEMATTN_AOT_SASS"):       # a folder: keep each variant's SASS and TTGIR
            d = Path(os.environ["MEMATTN_AOT_SASS"])
            d.mkdir(parents=True, exist_ok=True)
            stem = (f"{kernel.fn.__name__}_{kw.get('BLOCK_M')}x{kw.get('BLOCK_N')}_w{kw.get('num_warps')}"
                    f"_s{kw.get('num_stages')}{'_tma' if kw.get('USE_TMA') else ''}")
            (d / f"{stem}.sass").write_text(sass)
            (d / f"{stem}.ttgir").write_text(ck.asm["ttgir"])
        print(f"{kernel.fn.__name__:28s} BM={kw.get('BLOCK_M')} BN={kw.get('BLOCK_N')} w={kw.get('num_warps')} "
              f"tma={kw.get('USE_TMA')} "
              f"s={kw.get('num_stages')} regs={info['regs'] or '?'} spill={info['spill'] if info['spill'] is not None else '?'}"
              f" smem={ck.metadata.shared}  " + "; ".join(loops(sass)), flush=True)

    launch.set_launch_hook(hook)
    variants = [(128, P.causal(), 0.0, 0.0, torch.bfloat16), (64, P.causal(), 0.0, 0.0, torch.bfloat16),
                (128, P.document([128, 128]) & P.causal(), 0.0, 0.0, torch.bfloat16),
                (128, P.longformer(64, [0]), 0.0, 0.0, torch.bfloat16), (128, P.bigbird(), 0.0, 0.0, torch.bfloat16),
                (59, P.causal(), 20.0, 0.1, torch.bfloat16), (256, P.causal(), 0.0, 0.0, torch.bfloat16),
                (64, P.causal(), 0.0, 0.0, torch.float32), (128, P.random(16), 0.0, 0.0, torch.bfloat16),
                (64, P.random(16), 0.0, 0.0, torch.bfloat16)]
    only = os.environ.get("MEMATTN_AOT_ONLY")        # e.g. "0,4": a subset of the variants
    if only:
        variants = [variants[int(i)] for i in only.split(",")]
    tma_only = os.environ.get("MEMATTN_AOT_TMA") == "1"
    nq = int(os.environ.get("MEMATTN_AOT_NQ", "256"))   # e.g. 1: the decoding configs
    for D, pat, softcap, drop, dt in variants:
        q = torch.empty(1, 2, nq, D, dtype=dt)
        kv = torch.empty(1, 2, 256, D, dtype=dt)
        spec = masks.describe(pat, nq, 256, 2, "cpu", map_blocks=launch.map_blocks_for(torch.device("cuda")))
        m = function.mask_args(spec)
        mb = spec.map_block if spec.path == "map" else None
        tma_ok = launch._tma_ok(q)
        cands = {k: [c for c in launch.candidates(k, dt, D, "cuda", mb, 256, nq) if (c.tma or not tma_only)
                     and (tma_ok or not c.tma)] or launch.candidates(k, dt, D, "cuda", mb, 256, nq)[:1]
                 for k in ("fwd", "dkdva" if launch._BWD["mode"] == "atomic" else "dkdv", "dq")}
        print(f"-- D={D} {pat!r} {dt} softcap={softcap} dropout={drop} path={spec.path}", flush=True)
        for i in range(max(len(c) for c in cands.values())):
            cfg = {k: c[min(i, len(c) - 1)] for k, c in cands.items()}
            splits = int(os.environ.get("MEMATTN_AOT_SPLITS", "0")) or None   # e.g. 3: the split-KV merge
            with launch.override_configs(**cfg), launch.force_kv_splits(splits):
                out, lse = launch.forward(q, kv, kv, m, scale=0.1, softcap=softcap, dropout_p=drop, seed=1)
                launch.backward(q, kv, kv, out, out, lse.float(), m, scale=0.1, softcap=softcap, dropout_p=drop,
                                seed=1)
    return 0


def save(res: dict, out: str | None) -> Path | None:
    """Write ``res`` to ``out``/h200.json (through a temporary file, so a run cut mid-write
    keeps the previous checkpoint). :func:`run` calls it after every correctness task and
    every timed row: a run killed at the device's time limit still leaves what it finished."""
    if not out:
        return None
    path = Path(out) / "h200.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(_jsonable(res), fh, indent=1, default=str)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.aot:
        return aot_check()
    res = run(args)
    path = save(res, args.out)
    print(table(res), flush=True)
    print(f"wrote {path}" if path else "no --out: nothing written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
