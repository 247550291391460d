"""Block-map build cost of every pattern family: time, bytes and peak RSS growth.

Each (pattern, N) is measured in a fresh subprocess: the pattern is built, the process's
peak-RSS counter is reset (``/proc/self/clear_refs``), then the block map is built once
cold and three more times uncached (median reported), and the peak RSS growth over the
pre-build RSS is read from ``VmHWM``. Blocks are 128 x 128, Nq = Nk = N. Also prints each
pattern's density at N = 4096.

Usage:
    .venv/bin/python scripts/blockmap_scaling.py [--sizes 65536 262144 1048576] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MiB = 2 ** 20

# name -> constructor source (evaluated with `P` = memattn.patterns, `N` = the size)
CASES: dict[str, str] = {
    "causal": "P.causal()",
    "sliding_window(1023)": "P.sliding_window(1023)",
    "dilated(4096, 4)": "P.dilated(4096, 4)",
    "strided(4096, local=256)": "P.strided(4096, local=256)",
    "fixed(4096, 128)": "P.fixed(4096, 128)",
    "exponential(64) & causal()": "P.exponential(64) & P.causal()",
    "random(8)": "P.random(8)",
    "global_tokens(0..15)": "P.global_tokens(range(16))",
    "longformer(1024, 0..15)": "P.longformer(1024, range(16))",
    "bigbird()": "P.bigbird()",
    "document(~N/1750 docs)": "P.document(doc_lengths(N))",
    "sliding_window(1023, 1023) & causal()": "P.sliding_window(1023, 1023) & P.causal()",
    "document(~N/1750 docs) & causal()": "P.document(doc_lengths(N)) & P.causal()",
    # blocks of 1024 positions (N / 64 below 65536), ~4 random blocks per row plus the diagonal
    "block_sparse(random layout)": "P.block_sparse(layout(N // bsz(N)), bsz(N))",
}

# the density table at N = 4096 uses sizes that suit N = 4096 (the pictures' shapes, scaled)
DENSITY_CASES: dict[str, str] = {
    "full()": "P.full()",
    "causal()": "P.causal()",
    "sliding_window(256)": "P.sliding_window(256)",
    "sliding_window(128, 128)": "P.sliding_window(128, 128)",
    "dilated(1024, 4)": "P.dilated(1024, 4)",
    "strided(64, local=16) & causal()": "P.strided(64, local=16) & P.causal()",
    "strided(61, 67)": "P.strided(61, 67)",
    "fixed(64, 8) & causal()": "P.fixed(64, 8) & P.causal()",
    "exponential(8) & causal()": "P.exponential(8) & P.causal()",
    "random(32)": "P.random(32)",
    "global_tokens(range(8))": "P.global_tokens(range(8))",
    "longformer(256, range(8))": "P.longformer(256, range(8))",
    "bigbird()": "P.bigbird()",
    "document(lengths ~ U[1, 1024))": "P.document(doc_lengths(N, 1024))",
    "document(...) & causal()": "P.document(doc_lengths(N, 1024)) & P.causal()",
    "block_sparse(random 64x64 layout, N/64)": "P.block_sparse(layout(64), N // 64)",
    "from_mask_mod(prefix_lm, prefix 512)": "P.from_mask_mod(prefix_lm)",
}

# too large to build here: O((N / 128)^2) tiles (causal at 1M has 33.6M tiles)
SKIP = {("causal", 1048576)}

CHILD = r"""
import json, statistics, sys, time, torch
from memattn import patterns as P
from memattn.patterns.base import _cached_block_map

def doc_lengths(n, high=3500):
    g = torch.Generator().manual_seed(0)
    out, left = [], n
    while left > 0:
        x = min(left, int(torch.randint(1, high, (1,), generator=g)))
        out.append(x)
        left -= x
    return out

def layout(nb):
    g = torch.Generator().manual_seed(0)
    lay = torch.rand(nb, nb, generator=g) < 4 / nb
    lay |= torch.eye(nb, dtype=torch.bool)
    return lay

def prefix_lm(b, h, q, k):
    return (k <= q) | (k < 512)

def bsz(n):
    return 1024 if n >= 65536 else max(1, n // 64)

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0

N = int(sys.argv[2])
p = eval(sys.argv[1]).for_sizes(N, N)
build = _cached_block_map.__wrapped__
before = rss_kib("VmRSS:")
try:
    open("/proc/self/clear_refs", "w").write("5")   # reset VmHWM to the current RSS
except OSError:
    pass
t0 = time.perf_counter()
bm = build(p, N, N, 128, 128)
cold = time.perf_counter() - t0
peak = rss_kib("VmHWM:")
del bm
times = []
for _ in range(3):
    t0 = time.perf_counter()
    bm = build(p, N, N, 128, 128)
    times.append(time.perf_counter() - t0)
print(json.dumps(dict(cold_s=cold, median_s=statistics.median(times), nbytes=bm.nbytes(), tiles=bm.nnz,
                      full=int(bm.full.sum()), max_kv=bm.max_kv, rss_growth_kib=max(0, peak - before))))
"""

def run_case(src: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, src, str(n)], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc={out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def densities(n: int) -> dict[str, float]:
    code = CHILD.split("N = int(sys.argv[2])")[0] + (
        "N = %d\nres = {}\n" % n
        + "".join(f"res[{name!r}] = eval({src!r}).density(N, N)\n" for name, src in DENSITY_CASES.items())
        + "print(json.dumps(res))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    ap.add_argument("--only", nargs="*", default=None, help="pattern names (keys of CASES) to measure")
    ap.add_argument("--density-n", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    names = [k for k in CASES if args.only is None or k in args.only]
    rows = []
    print(f"| pattern | N | build (cold) s | build (median of 3) s | tiles | full | max_kv | map MiB | peak RSS growth MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        for n in args.sizes:
            if (name, n) in SKIP:
                print(f"| {name} | {n} | not built: O((N/128)²) tiles | | | | | | |")
                continue
            r = run_case(CASES[name], n)
            rows.append(dict(pattern=name, n=n, **r))
            if "error" in r:
                print(f"| {name} | {n} | error: {r['error']} | | | | | | |")
                continue
            print(f"| {name} | {n} | {r['cold_s']:.3f} | {r['median_s']:.3f} | {r['tiles']} | {r['full']} | "
                  f"{r['max_kv']} | {r['nbytes'] / MiB:.2f} | {r['rss_growth_kib'] / 1024:.1f} |", flush=True)
    dens = densities(args.density_n)
    print(f"\n| pattern | density at N = {args.density_n} |\n|---|---:|")
    for name, value in dens.items():
        print(f"| {name} | {value:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, density=dens, density_n=args.density_n), indent=1))


if __name__ == "__main__":
    main()
