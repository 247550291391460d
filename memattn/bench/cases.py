"""The benchmark registry: a case is one (implementation × shape × dtype × device) point.

Cases are frozen dataclasses, so a suite is plain data; named suites (``quick``,
``anchors``, ``scaling``, ``decode``, ``patterns``) are functions of the device. The
peer figures of ``shared/anchors.md`` live here too (:data:`ANCHORS`), keyed by case,
so a run prints its measured number beside the expected one.

Units everywhere in ``memattn.bench``: milliseconds, MiB = 2**20 bytes, TFLOP/s = 1e12
FLOP/s, TB/s = 1e12 B/s.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable

__all__ = [
    "Case", "PatternSpec", "parse_pattern", "parse_size", "format_size", "SUITES", "suite",
    "ANCHORS", "anchor_for", "MiB", "GiB", "DTYPES", "PASSES",
]

MiB = 2**20
GiB = 2**30
DTYPES = ("float16", "bfloat16", "float32", "float64")
PASSES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------- sizes
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 2**10, "KI": 2**10, "M": 2**20, "MI": 2**20, "G": 2**30, "GI": 2**30,
          "T": 2**40, "TI": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"8GiB"``, ``"512MiB"``, ``"2G"`` (binary) or ``"1.5GB"`` (decimal).

    ``KiB/MiB/GiB/TiB`` and the bare ``K/M/G/T`` are powers of 1024; ``KB/MB/GB/TB`` are
    powers of 1000; a bare number is bytes.

    Args:
        text: the size as text.
    Returns:
        int bytes (> 0).
    Raises:
        ValueError: unparseable or not positive.

    Example:
        >>> parse_size("2GiB"), parse_size("1.5MB"), parse_size("4096")
        (2147483648, 1500000, 4096)
    """
    if not isinstance(text, str):
        raise TypeError(f"size must be a str, got {type(text).__name__}")
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional unit (B, KiB, MiB, GiB, TiB, KB, MB, GB)")
    unit = (m.group(2) or "").upper()
    if unit not in _UNITS:
        raise ValueError(f"size {text!r} has an unknown unit {m.group(2)!r}")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def format_size(nbytes: float) -> str:
    """``"1.50 GiB"`` style text for a byte count (binary units).

    Example:
        >>> format_size(3 * 2**29)
        '1.50 GiB'
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


# --------------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class PatternSpec:
    """A pattern named in text, ``name:arg1,arg2`` (e.g. ``sliding_window:1024``, ``documents:16``).

    ``documents:K`` means K equal causal-free documents packed in N (built with
    ``memattn.patterns.document``); any other name calls the factory of the same name in
    :mod:`memattn.patterns` with the integer arguments.
    """

    name: str
    args: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.name + (":" + ",".join(str(a) for a in self.args) if self.args else "")

    def build(self, n: int):
        """The :class:`memattn.patterns.Pattern` for sequence length ``n`` (imports lazily)."""
        from .. import patterns as P

        if self.name == "documents":
            (k,) = self.args or (1,)
            if not hasattr(P, "document"):
                raise NotImplementedError("memattn.patterns.document is not available yet")
            base, rem = divmod(n, k)
            return P.document([base + (1 if i < rem else 0) for i in range(k)])
        factory = getattr(P, self.name, None)
        if factory is None or not callable(factory):
            raise NotImplementedError(f"memattn.patterns has no factory {self.name!r}")
        return factory(*self.args)


def parse_pattern(text: str | None) -> PatternSpec | None:
    """Parse ``"sliding_window:1024"`` into a :class:`PatternSpec` (None/"none"/"" → None).

    Example:
        >>> parse_pattern("sliding_window:1024")
        PatternSpec(name='sliding_window', args=(1024,))
    """
    if text is None or text.strip().lower() in ("", "none", "full"):
        return None
    name, _, rest = text.strip().partition(":")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"pattern {text!r}: name must be an identifier such as sliding_window")
    try:
        args = tuple(int(a) for a in rest.split(",")) if rest else ()
    except ValueError:
        raise ValueError(f"pattern {text!r}: arguments must be integers, e.g. sliding_window:1024") from None
    return PatternSpec(name, args)


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One benchmark point.

    Attributes:
        impl: implementation name from :data:`memattn.bench.peers.IMPLS` (``memattn``,
            ``naive``, ``sdpa``, ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``flex``,
            ``linear``, ``performer``, ``fla-linear``).
        n: key length Nk (and Nq unless ``nq`` is given).
        d: head dim. heads: query heads Hq. batch: B. kv_heads: Hkv (None = heads).
        causal: keep key position <= query position. pattern: extra pattern (text spec).
        dtype: "float16" | "bfloat16" | "float32" | "float64". device: "cpu" | "cuda".
        nq: query length (1 = decoding); None = n.
        backend: memattn backend for ``impl == "memattn"`` ("auto", "cpu", "triton", "reference").
        passes: which of "fwd", "fwd+bwd" to time.
        group: a free label used to group rows in tables and plots (e.g. "anchors D=128").
    Example:
        >>> Case("naive", 1024, causal=True).shape_text
        'B1 H8 N1024 D64'
    """

    impl: str
    n: int
    d: int = 64
    heads: int = 8
    batch: int = 1
    causal: bool = False
    pattern: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    nq: int | None = None
    kv_heads: int | None = None
    backend: str = "auto"
    passes: tuple[str, ...] = PASSES
    group: str = ""

    def __post_init__(self) -> None:
        for name in ("n", "d", "heads", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Case.{name} must be a positive int, got {v!r}")
        if self.nq is not None and (not isinstance(self.nq, int) or not 1 <= self.nq <= self.n):
            raise ValueError(f"Case.nq must be an int in [1, n={self.n}], got {self.nq!r}")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"Case.kv_heads must divide heads={self.heads}, got {self.kv_heads!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Case.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"Case.device must be 'cpu' or 'cuda', got {self.device!r}")
        bad = [p for p in self.passes if p not in PASSES]
        if bad or not self.passes:
            raise ValueError(f"Case.passes must be a non-empty subset of {PASSES}, got {self.passes!r}")
        parse_pattern(self.pattern)  # validates the spec

    @property
    def q_len(self) -> int:
        return self.nq if self.nq is not None else self.n

    @property
    def hkv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def pattern_spec(self) -> PatternSpec | None:
        return parse_pattern(self.pattern)

    @property
    def is_decode(self) -> bool:
        return self.q_len == 1

    @property
    def mask_text(self) -> str:
        parts = []
        if self.pattern:
            parts.append(self.pattern)
        if self.causal:
            parts.append("causal")
        return "&".join(parts) if parts else "full"

    @property
    def shape_text(self) -> str:
        h = f"H{self.heads}" + (f"/{self.kv_heads}" if self.kv_heads and self.kv_heads != self.heads else "")
        nq = f"Nq{self.nq} " if self.nq is not None and self.nq != self.n else ""
        return f"B{self.batch} {h} {nq}N{self.n} D{self.d}"

    def series_key(self) -> tuple:
        """Everything but impl and N: the rows of one line in a scaling plot."""
        return (self.group, self.d, self.heads, self.hkv, self.batch, self.causal, self.pattern,
                self.dtype, self.device, self.nq is not None and self.nq != self.n and self.q_len)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passes"] = list(self.passes)
        return d

    @staticmethod
    def from_dict(d: dict) -> "Case":
        d = dict(d)
        d["passes"] = tuple(d.get("passes", PASSES))
        return Case(**d)


# ------------------------------------------------------------------------------ suites
_Suite = Callable[[str], list[Case]]
SUITES: dict[str, tuple[str, _Suite]] = {}


def _register(name: str, doc: str) -> Callable[[_Suite], _Suite]:
    def deco(fn: _Suite) -> _Suite:
        SUITES[name] = (doc, fn)
        return fn
    return deco


def _grid(impls: Iterable[str], ns: Iterable[int], **kw) -> list[Case]:
    return [Case(impl, n, **kw) for n in ns for impl in impls]


def _exact_peers(device: str) -> tuple[str, ...]:
    if device == "cuda":
        return ("memattn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
    return ("memattn", "naive", "sdpa")


@_register("quick", "CPU-sized smoke run: exact memattn vs naive and SDPA, causal, N 512–2048, "
                    "a sliding window, a decode step and linear attention (< 2 min on 2 cores)")
def _quick(device: str) -> list[Case]:
    kw = dict(d=64, heads=4, batch=1, causal=True, device=device, group="quick")
    dt = "float32" if device == "cpu" else "bfloat16"
    cases = _grid(_exact_peers(device), (512, 1024, 2048), dtype=dt, **kw)
    cases += _grid(("memattn", "naive", "sdpa"), (2048,), pattern="sliding_window:256", dtype=dt,
                   **{**kw, "group": "quick window"})
    cases += _grid(("memattn", "sdpa"), (4096,), nq=1, dtype=dt, passes=("fwd",),
                   **{**kw, "causal": False, "group": "quick decode"})
    cases += _grid(("linear",), (512, 1024, 2048), dtype=dt, **kw)
    return cases


@_register("scaling", "N from 1k to 16k (naive to 8k on the CPU), causal, B1 H8 D64: the demo's grid")
def _scaling(device: str) -> list[Case]:
    dt = "float32" if device == "cpu" else "bfloat16"
    kw = dict(d=64, heads=8, batch=1, causal=True, device=device, dtype=dt, group="scaling")
    ns = (1024, 2048, 4096, 8192, 16384)
    naive_ns = tuple(n for n in ns if device == "cuda" or n <= 8192)
    cases = _grid([i for i in _exact_peers(device) if i != "naive"], ns, **kw)
    cases += _grid(("naive",), naive_ns, **kw)
    cases += _grid(("memattn",), ns, pattern="sliding_window:512", **kw)
    return cases


@_register("anchors", "shared/anchors.md on a GPU: dense D=128/64 B·N=16384 hidden 2048 bf16, windows and "
                      "documents (B1 H16 D128), decoding (B8 H32 D128), SDPA backends, FlexAttention, memattn")
def _anchors(device: str) -> list[Case]:
    cases: list[Case] = []
    peers = ("memattn", "sdpa-flash", "sdpa-cudnn", "flex", "sdpa-efficient")
    for causal in (False, True):
        for n in (1024, 4096, 16384):
            cases += _grid(peers, (n,), d=128, heads=16, batch=16384 // n, causal=causal, dtype="bfloat16",
                           device=device, backend="auto", group="anchors D=128")
        cases += _grid(peers[:4], (16384,), d=64, heads=32, batch=1, causal=causal, dtype="bfloat16",
                       device=device, group="anchors D=64")
    for n in (16384, 65536, 131072):
        cases += _grid(("memattn", "flex"), (n,), d=128, heads=16, batch=1, causal=True,
                       pattern="sliding_window:1024", dtype="bfloat16", device=device, group="anchors window")
        if n > 16384:  # at 16384 the dense causal row of "anchors D=128" is this very case
            cases += _grid(("sdpa-cudnn",), (n,), d=128, heads=16, batch=1, causal=True, dtype="bfloat16",
                           device=device, group="anchors window")
    cases += _grid(("memattn", "flex"), (65536,), d=128, heads=16, batch=1, causal=True,
                   pattern="documents:16", dtype="bfloat16", device=device, group="anchors documents")
    for n in (8192, 65536):
        cases += _grid(("memattn", "sdpa-cudnn", "sdpa-flash"), (n,), d=128, heads=32, batch=8, nq=1,
                       dtype="bfloat16", device=device, passes=("fwd",), group="anchors decode")
    for n, b in ((4096, 4), (16384, 1), (65536, 1)):
        cases += _grid(("linear", "fla-linear"), (n,), d=128, heads=16, batch=b, causal=True,
                       dtype="bfloat16", device=device, group="anchors linear")
    return cases


@_register("decode", "one query against a KV cache, N 1k–64k (B8 H32 D128 on CUDA, B1 H8 D64 on the CPU)")
def _decode(device: str) -> list[Case]:
    if device == "cuda":
        kw = dict(d=128, heads=32, batch=8, dtype="bfloat16", ns=(1024, 8192, 65536))
    else:
        kw = dict(d=64, heads=8, batch=1, dtype="float32", ns=(1024, 4096, 16384))
    ns = kw.pop("ns")
    impls = ("memattn", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient") if device == "cuda" else ("memattn", "sdpa")
    return _grid(impls, ns, nq=1, passes=("fwd",), device=device, group="decode", **kw)


@_register("patterns", "memattn with a causal sliding window 256 and 16 documents, N 2k–16k, vs dense causal")
def _patterns(device: str) -> list[Case]:
    dt = "float32" if device == "cpu" else "bfloat16"
    kw = dict(d=64, heads=4 if device == "cpu" else 16, batch=1, causal=True, device=device, dtype=dt,
              group="patterns")
    ns = (2048, 4096, 8192, 16384)
    cases = _grid(("memattn",), ns, **kw)
    cases += _grid(("memattn",) + (("flex",) if device == "cuda" else ()), ns, pattern="sliding_window:256", **kw)
    cases += _grid(("memattn",) + (("flex",) if device == "cuda" else ()), ns, pattern="documents:16", **kw)
    return cases


def suite(name: str, device: str) -> list[Case]:
    """The cases of a named suite for a device.

    Args:
        name: a key of :data:`SUITES`.
        device: "cpu" or "cuda".
    Returns:
        list of :class:`Case`.
    Raises:
        ValueError: unknown suite or device.

    Example:
        >>> len(suite("quick", "cpu")) > 0
        True
    """
    if name not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {name!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return SUITES[name][1](device)


# ----------------------------------------------------------------------------- anchors
@dataclass(frozen=True)
class Anchor:
    """An expected peer figure from shared/anchors.md: ``fwd`` / ``fwdbwd`` in ``unit``."""

    fwd: float | None
    fwdbwd: float | None
    unit: str  # "TFLOP/s", "ms" or "TB/s"
    source: str = "anchors.md (H200, torch 2.11)"


def _dense_anchors() -> dict[tuple, Anchor]:
    t: dict[tuple, Anchor] = {}
    d128 = {  # (causal, n): flash, cudnn, flex, efficient  (fwd, fwd+bwd) TFLOP/s
        (False, 1024): ((327, 252), (557, 481), (398, 364), (165, 128)),
        (False, 4096): ((341, 306), (594, 531), (463, 415), (172, 143)),
        (False, 16384): ((349, 319), (612, 552), (473, 424), (174, 147)),
        (True, 1024): ((247, 187), (429, 340), (266, 258), (137, 100)),
        (True, 4096): ((307, 268), (551, 466), (367, 349), (159, 126)),
        (True, 16384): ((321, 315), (568, 538), (408, 386), (168, 139)),
    }
    names = ("sdpa-flash", "sdpa-cudnn", "flex", "sdpa-efficient")
    for (causal, n), vals in d128.items():
        for impl, (f, fb) in zip(names, vals):
            t[(impl, 128, n, causal, None, None)] = Anchor(f, fb, "TFLOP/s")
    d64 = {False: ((308, 291), (449, 448), (409, 344)), True: ((299, 280), (440, 435), (381, 318))}
    for causal, vals in d64.items():
        for impl, (f, fb) in zip(names[:3], vals):
            t[(impl, 64, 16384, causal, None, None)] = Anchor(f, fb, "TFLOP/s")
    for n, (f, fb) in ((16384, (0.435, 1.553)), (65536, (1.689, 6.489)), (131072, (3.42, 12.99))):
        t[("flex", 128, n, True, "sliding_window:1024", None)] = Anchor(f, fb, "ms")
    for n, (f, fb) in ((16384, (1.95, 7.30)), (65536, (29.4, 112.9)), (131072, (137, 462))):
        t[("sdpa-cudnn", 128, n, True, None, "window")] = Anchor(f, fb, "ms")
    t[("flex", 128, 65536, True, "documents:16", None)] = Anchor(2.92, 10.93, "ms")
    for n, v in ((8192, 4.3), (65536, 4.6)):
        t[("sdpa-cudnn", 128, n, False, None, "decode")] = Anchor(v, None, "TB/s")
    for n in (8192, 65536):
        t[("sdpa-flash", 128, n, False, None, "decode")] = Anchor(2.6, None, "TB/s")
    for n, (f, fb) in ((4096, (0.19, 1.13)), (16384, (0.23, 1.72)), (65536, (0.88, 4.07))):
        t[("fla-linear", 128, n, True, None, "linear")] = Anchor(f, fb, "ms")
    return t


ANCHORS: dict[tuple, Anchor] = _dense_anchors()


def anchor_for(case: Case) -> Anchor | None:
    """The anchors.md figure expected for this case on an H200, or None.

    Example:
        >>> anchor_for(Case("sdpa-cudnn", 4096, d=128, heads=16, batch=4, dtype="bfloat16", device="cuda")).fwd
        594
    """
    if case.device != "cuda" or case.dtype != "bfloat16":
        return None
    if case.group.endswith("decode"):
        return ANCHORS.get((case.impl, case.d, case.n, False, None, "decode")) if case.is_decode else None
    if case.group.endswith("linear"):
        return ANCHORS.get((case.impl, case.d, case.n, case.causal, None, "linear"))
    if case.group.endswith("window") and case.pattern is None:
        return ANCHORS.get((case.impl, case.d, case.n, case.causal, None, "window"))
    # dense anchors: B·N = 16384, hidden 2048
    if case.pattern is None and case.batch * case.n != 16384 or case.pattern is None and case.heads * case.d != 2048:
        return None
    return ANCHORS.get((case.impl, case.d, case.n, case.causal, case.pattern, None))


def with_overrides(cases: list[Case], **kw) -> list[Case]:
    """Copy cases with fields replaced (None values ignored)."""
    kw = {k: v for k, v in kw.items() if v is not None}
    return [replace(c, **kw) for c in cases] if kw else list(cases)

