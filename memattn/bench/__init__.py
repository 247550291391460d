"""Benchmark tools: a registry of cases, peers, timing, peak memory, plots and reports.

Used by the ``memattn`` console script (``memattn bench``, ``memattn memory``,
``memattn demo``). Importing this package is light; matplotlib, tqdm and psutil (the
``cli`` extra) are imported only by the functions that need them.

Example:
    >>> from memattn.bench import Case, run_case, RunOptions
    >>> row = run_case(Case("sdpa", 256, d=32, heads=2, causal=True), RunOptions(max_seconds=0.05))
    >>> row["status"]
    'ok'
"""

from .cases import Case, SUITES, parse_pattern, parse_size, suite
from .runner import RunOptions, run_case, run_cases

__all__ = ["Case", "SUITES", "suite", "parse_size", "parse_pattern", "RunOptions", "run_case", "run_cases"]
