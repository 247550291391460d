"""``memattn eval``: quality of every mechanism, written as JSON, Markdown and plots.

Parts (``--parts``, default all):
  dropin   SmolLM2 perplexity and MiniLM embedding cosine for each pattern and mechanism,
           beside its attention memory, plus the exact-vs-SDPA checks;
  error    relative error of each variant on q, k, v captured from both models, per layer;
  mqar     Multi-Query Associative Recall, a small model per catalogue mechanism;
  listops  ListOps (shortened), a small classifier per catalogue mechanism.

Suites: ``quick`` fits in about 10 minutes on a 2-core CPU (one 2048-token sequence, a
handful of variants, small MQAR/ListOps budgets on a few mechanisms); ``full`` covers
every variant and every catalogue mechanism at the acceptance sizes (CPU possible, GPU
faster: ``--device cuda``).

Example:
    memattn eval --suite quick --out eval_out
    memattn eval --suite full --device cuda --out eval_full --parts dropin,error
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main", "Suite", "SUITES", "build_parser"]

PARTS = ("dropin", "error", "mqar", "listops")


@dataclass(frozen=True)
class Suite:
    """Sizes and budgets of one suite."""

    name: str
    smol_seqs: int
    smol_variants: tuple[str, ...] | None  # None: every variant
    smol_error_layers: tuple[int, ...]
    minilm_variants: tuple[str, ...] | None
    minilm_lengths: tuple[int, ...]
    mqar: dict
    mqar_mechanisms: tuple[str, ...] | None  # None: every catalogue mechanism
    listops: dict
    listops_mechanisms: tuple[str, ...] | None
    smol_len: int = 2048
    gen_tokens: int = 32
    gen_prompt: int = 64
    smol_play: str = "hamlet_gut"
    minilm_play: str = "macbeth_gut"


SUITES: dict[str, Suite] = {
    "quick": Suite(
        name="quick", smol_seqs=1,
        smol_variants=("SDPA", "exact", "window 256", "window 64 + 4 sinks", "linear elu"),
        smol_error_layers=(0, 29),
        minilm_variants=("SDPA", "exact", "window 64", "window 64 + 4 sinks", "Longformer", "BigBird", "Performer 256",
                         "linear elu", "Nyström 64"),
        minilm_lengths=(24, 48, 64, 96, 128, 192, 256, 510),
        mqar=dict(seq_len=64, num_pairs=8, vocab_size=128, d_model=64, layers=2, num_heads=2, batch_size=32,
                  steps=150, lr=1e-2, test_examples=256),
        mqar_mechanisms=("exact", "window"),
        listops=dict(min_len=16, max_len=64, train_examples=1000, test_examples=300, steps=150, batch_size=32,
                     lr=2e-3, d_model=64, layers=2, num_heads=2),
        listops_mechanisms=("exact",),
    ),
    "full": Suite(
        name="full", smol_seqs=2, smol_variants=None,
        smol_error_layers=tuple(range(0, 30, 3)) + (29,),
        minilm_variants=None,
        minilm_lengths=(16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 320, 384, 448, 510),
        mqar=dict(seq_len=256, num_pairs=16, vocab_size=128, d_model=64, layers=2, num_heads=2, batch_size=32,
                  steps=300, lr=1e-2, test_examples=512),
        mqar_mechanisms=None,
        listops=dict(min_len=32, max_len=384, train_examples=2000, test_examples=500, steps=300, batch_size=32,
                     lr=2e-3, d_model=64, layers=2, num_heads=2),
        listops_mechanisms=None,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memattn eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="quick", help="sizes and budgets (default quick)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--out", default="eval_out", help="output folder (quality.json, quality.md, *.png)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--mechanisms", default=None,
                   help="comma-separated catalogue mechanisms for mqar/listops (default: the suite's)")
    p.add_argument("--steps", type=int, default=None, help="override the training steps of mqar and listops")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class _Progress:
    """One tqdm bar per part (a no-op without tqdm or with --no-progress)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, total: int, desc: str):
        if not self.enabled:
            return _NullBar()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return _NullBar()
        return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _check(name: str, value: float | bool | None, target: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "pass": bool(ok)}


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------
def _run_smollm2(suite: Suite, device: str, parts: set[str], prog: _Progress, result: dict) -> None:
    from . import approx_error, dropin
    from .data import load_smollm2
    from .variants import DROPIN, by_name

    variants = DROPIN if suite.smol_variants is None else by_name(suite.smol_variants)
    model, tok = load_smollm2(device)
    ids = dropin.smollm2_ids(tok, suite.smol_play, suite.smol_len, suite.smol_seqs)
    layers = sorted(set(suite.smol_error_layers) | {0})
    caps = dropin.capture_layers(model, {"input_ids": ids[:1].to(device)}, layers)
    mem_cap = caps[0]
    shape = mem_cap.shape
    if "dropin" in parts:
        rows = []
        n_work = len(variants) * suite.smol_seqs + 2 * suite.smol_seqs + 2
        bar = prog.bar(n_work, "SmolLM2 perplexity")
        base_ppl = None
        for var in variants:
            row: dict[str, Any] = {"variant": var.name, "kind": var.kind, "description": var.description}
            if not var.supports(True):
                row["note"] = "not causal: cannot serve a decoder"
                bar.update(suite.smol_seqs)
                rows.append(row)
                continue
            try:
                r = dropin.perplexity(model, ids, var.register(True), device=device, progress=lambda: bar.update())
                row.update(ppl=r["ppl"], nll=r["nll"], seconds=r["seconds"])
                state = var.decode_state(shape, suite.smol_len)
                row["decode_state_bytes"] = None if state is None else 4 * state
                row["attn_mem_bytes"] = dropin.attention_memory(var, mem_cap, True, device)
            except Exception as e:  # a failing variant becomes a row saying why
                row["error"] = f"{type(e).__name__}: {e}"
            if var.kind == "sdpa":
                base_ppl = row.get("ppl")
            bar.set_postfix_str(f"{var.name}: {row.get('ppl', float('nan')):.3f}")
            rows.append(row)
        for row in rows:
            if base_ppl and row.get("ppl"):
                row["ppl_ratio"] = row["ppl"] / base_ppl
        # checks: exact vs SDPA, pattern vs the same mask by hand, greedy decoding with the cache
        checks = result.setdefault("checks", [])
        by = {r["variant"]: r for r in rows}
        if by.get("exact", {}).get("ppl") and base_ppl:
            rel = abs(by["exact"]["ppl"] - base_ppl) / base_ppl
            checks.append(_check(f"SmolLM2 perplexity, exact vs SDPA, relative ({suite.smol_len} tokens)", rel,
                                 "<= 1e-4", rel <= 1e-4))
        hand = dropin.hand_mask_perplexity(model, ids, 64, 4, device=device)
        bar.update(suite.smol_seqs)
        sinks = by.get("window 64 + 4 sinks")
        if sinks is None:
            sinks_var = by_name(["window 64 + 4 sinks"])[0]
            sinks = {"ppl": dropin.perplexity(model, ids, sinks_var.register(True), device=device)["ppl"]}
        bar.update(suite.smol_seqs)
        rel = abs(sinks["ppl"] - hand["ppl"]) / hand["ppl"]
        checks.append(_check("register(pattern=window 64 | 4 sinks) vs the same 4-D mask by hand (SDPA), "
                             "perplexity relative", rel, "<= 1e-4", rel <= 1e-4))
        prompt = ids[:1, :suite.gen_prompt]
        exact_name = by_name(["exact"])[0].register(True)
        g_sdpa = dropin.greedy_tokens(model, prompt, "sdpa", suite.gen_tokens, device=device)
        bar.update()
        g_mem = dropin.greedy_tokens(model, prompt, exact_name, suite.gen_tokens, device=device)
        bar.update()
        same = g_sdpa == g_mem
        checks.append(_check(f"SmolLM2 {suite.gen_tokens} greedy tokens with the KV cache, exact == SDPA", same,
                             "identical", same))
        bar.close()
        result.setdefault("dropin", {})["smollm2"] = {
            "play": suite.smol_play, "seq_len": suite.smol_len, "num_seqs": suite.smol_seqs, "memory_layer": 0,
            "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "rows": rows,
            "hand_mask_ppl": hand["ppl"], "greedy_sdpa": g_sdpa, "greedy_exact": g_mem}
    if "error" in parts:
        err_caps = [c for c in caps if c.layer in set(suite.smol_error_layers)]
        bar = prog.bar(len(variants) * len(err_caps), "SmolLM2 approximation error")
        errs = approx_error.layer_errors(variants, err_caps, True, progress=bar.update)
        bar.close()
        result.setdefault("approx_error", {})["SmolLM2-135M"] = {
            "layers": [c.layer for c in err_caps], "n": suite.smol_len, "errors": errs}
    del model, caps


def _run_minilm(suite: Suite, device: str, parts: set[str], prog: _Progress, result: dict) -> None:
    from . import approx_error, dropin
    from .data import load_minilm
    from .variants import DROPIN, by_name

    variants = DROPIN if suite.minilm_variants is None else by_name(suite.minilm_variants)
    model, tok = load_minilm(device)
    batch = dropin.minilm_batch(tok, suite.minilm_play, suite.minilm_lengths)
    longest = int(batch["attention_mask"].sum(1).argmax())
    single = {k: v[longest:longest + 1, :int(batch["attention_mask"][longest].sum())].to(device)
              for k, v in batch.items()}
    caps = dropin.capture_layers(model, single, None)
    if "dropin" in parts:
        bar = prog.bar(len(variants) + 1, "MiniLM embeddings")
        ref = dropin.sentence_embeddings(model, batch, "sdpa", device=device)
        bar.update()
        rows = []
        for var in variants:
            row: dict[str, Any] = {"variant": var.name, "kind": var.kind, "description": var.description}
            try:
                e = dropin.sentence_embeddings(model, batch, var.register(False), device=device)
                cos = (e * ref).sum(-1)
                row.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()))
                row["attn_mem_bytes"] = dropin.attention_memory(var, caps[0], False, device)
            except Exception as ex:
                row["error"] = f"{type(ex).__name__}: {ex}"
            rows.append(row)
            bar.update()
        bar.close()
        checks = result.setdefault("checks", [])
        ex = next((r for r in rows if r["variant"] == "exact"), None)
        if ex and ex.get("cos_min") is not None:
            checks.append(_check(f"MiniLM padded batch of {len(suite.minilm_lengths)}, exact vs SDPA, min cosine",
                                 ex["cos_min"], ">= 0.99999", ex["cos_min"] >= 0.99999))
        result.setdefault("dropin", {})["minilm"] = {
            "play": suite.minilm_play, "num_passages": len(suite.minilm_lengths), "min_len": min(suite.minilm_lengths),
            "max_len": max(suite.minilm_lengths), "memory_layer": 0, "memory_n": int(single["input_ids"].shape[1]),
            "rows": rows}
    if "error" in parts:
        bar = prog.bar(len(variants) * len(caps), "MiniLM approximation error")
        errs = approx_error.layer_errors(variants, caps, False, progress=bar.update)
        bar.close()
        result.setdefault("approx_error", {})["all-MiniLM-L6-v2"] = {
            "layers": [c.layer for c in caps], "n": int(single["input_ids"].shape[1]), "errors": errs}


def _mechanisms(requested: tuple[str, ...] | None, override: str | None) -> list[str]:
    from .train import mechanism_names

    allm = mechanism_names()
    names = list(allm) if requested is None else list(requested)
    if override:
        names = [n.strip() for n in override.split(",") if n.strip()]
    unknown = [n for n in names if n not in allm]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; the catalogue has {allm}")
    return names


def _run_task(task: str, suite: Suite, device: str, prog: _Progress, result: dict, args) -> None:
    from . import train

    if task == "mqar":
        cfg = train.MQARConfig(**{**suite.mqar, "seed": args.seed})
        names = _mechanisms(suite.mqar_mechanisms, args.mechanisms)
        data = None
    else:
        cfg = train.ListOpsConfig(**{**suite.listops, "seed": args.seed})
        names = _mechanisms(suite.listops_mechanisms, args.mechanisms)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=int(args.steps))
    if task == "listops":
        data = train.listops_data(cfg)
    bar = prog.bar(cfg.steps * len(names), task)
    rows = []
    for name in names:
        def step(i: int, loss: float, name=name) -> None:
            bar.update()
            if i % 20 == 0:
                bar.set_postfix_str(f"{name} loss {loss:.3f}")
        try:
            if task == "mqar":
                r = train.train_mqar(name, cfg, device=device, progress=step)
            else:
                r = train.train_listops(name, cfg, data, device=device, progress=step)
            rows.append({"mechanism": name, **r})
        except Exception as e:
            rows.append({"mechanism": name, "accuracy": None, "error": f"{type(e).__name__}: {e}"})
    bar.close()
    entry: dict[str, Any] = {"config": dataclasses.asdict(cfg), "rows": rows}
    if task == "listops":
        entry["chance"] = 0.1
        entry["majority"] = next((r["majority"] for r in rows if "majority" in r), None)
    result.setdefault("tasks", {})[task] = entry


# ----------------------------------------------------------------------------------------------
def _meta(suite: Suite, device: str, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    import memattn

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = None
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor() or
                                                                                  platform.machine())
    return {"suite": suite.name, "device": device, "device_name": name, "torch": torch.__version__,
            "transformers": tv, "memattn": memattn.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(argv)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``memattn eval``; returns 0 when every part ran and every check passed, 1 otherwise,
    2 for bad arguments.

    Args:
        argv: the arguments after ``eval`` (default ``sys.argv[1:]``).
    Returns:
        exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    bad = parts - set(PARTS)
    if bad or not parts:
        print(f"memattn eval: --parts must be a subset of {','.join(PARTS)}, got {args.parts!r}", file=sys.stderr)
        return 2
    device = args.device
    if not (device == "cpu" or device.startswith("cuda")):
        print(f"memattn eval: --device must be cpu or cuda[:N], got {device!r}", file=sys.stderr)
        return 2
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print("memattn eval: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("memattn eval: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    suite = SUITES[args.suite]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prog = _Progress(not args.no_progress)
    result: dict[str, Any] = {"meta": _meta(suite, device, argv), "errors": []}
    t0 = time.perf_counter()
    jobs: list[tuple[str, Callable[[], None]]] = []
    if parts & {"dropin", "error"}:
        jobs.append(("smollm2", lambda: _run_smollm2(suite, device, parts, prog, result)))
        jobs.append(("minilm", lambda: _run_minilm(suite, device, parts, prog, result)))
    for task in ("mqar", "listops"):
        if task in parts:
            jobs.append((task, lambda task=task: _run_task(task, suite, device, prog, result, args)))
    for name, job in jobs:
        try:
            job()
        except Exception as e:  # record and go on: one missing model must not hide the rest
            result["errors"].append({"part": name, "error": f"{type(e).__name__}: {e}",
                                     "trace": traceback.format_exc(limit=4)})
            print(f"memattn eval: {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        result["meta"]["wall_seconds"] = time.perf_counter() - t0
        _write(result, out)  # partial results survive an interruption
    result["meta"]["wall_seconds"] = time.perf_counter() - t0
    paths = _write(result, out)
    print(f"memattn eval: wrote {', '.join(str(p) for p in paths)} in {result['meta']['wall_seconds']:.0f} s")
    failed = [c["name"] for c in result.get("checks", []) if not c["pass"]]
    for c in failed:
        print(f"memattn eval: check failed: {c}", file=sys.stderr)
    return 1 if failed or result["errors"] else 0


def _write(result: dict[str, Any], out: Path) -> list[Path]:
    from . import report

    plots: dict[str, str] = {}
    try:
        p = report.plot_pareto(result, out / "pareto.png")
        if p:
            plots["pareto"] = p.name
        for model, errs in result.get("approx_error", {}).items():
            p = report.plot_layer_errors(errs, out / f"errors_{_slug(model)}.png", f"{model}: error per layer")
            if p:
                plots[f"errors_{model}"] = p.name
        p = report.plot_tasks(result.get("tasks", {}), out / "tasks.png")
        if p:
            plots["tasks"] = p.name
    except ImportError as e:  # matplotlib missing: tables only
        result.setdefault("notes", []).append(f"plots skipped: {e}")
    paths = [report.write_json(result, out / "quality.json")]
    md = out / "quality.md"
    md.write_text(report.markdown(result, plots) + "\n")
    paths.append(md)
    return paths + [out / v for v in plots.values()]


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s.lower()).strip("-")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
