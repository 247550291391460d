"""What a benchmark runs: memattn and its peers behind one small interface.

An :class:`Impl` turns a :class:`~memattn.bench.cases.Case` and its inputs into a
:class:`Prepared` call: ``fn()`` runs the forward pass and returns the output
(B, Hq, Nq, Dv); ``context`` is entered around every call (e.g. an SDPA backend
choice); ``setup_ms`` is a one-off cost timed apart (FlexAttention's block mask build).
Peers are imported lazily; a missing one gives a row marked "unavailable", a case it
cannot serve a row marked "unsupported" (its reason), never a crash.

Implementations (:data:`IMPLS`):

=================  ===========================================================================
memattn            ``memattn.attention`` (backend from the case: auto → triton on CUDA, cpu on CPU)
naive              softmax(q kᵀ · scale + mask) v in plain PyTorch, scores materialised
sdpa               ``torch.nn.functional.scaled_dot_product_attention``, PyTorch's choice of kernel
sdpa-flash/-cudnn/-efficient/-math   SDPA restricted to one backend (``sdpa_kernel``)
flex               ``torch.compile(flex_attention)`` with ``create_block_mask(_compile=True)``
linear             ``memattn.approx.linear_attention`` (elu+1 features; approximate)
performer          ``memattn.approx.performer_attention`` (FAVOR+, 256 features; approximate)
fla-linear         ``fla.ops.linear_attn.chunk_linear_attn`` (CUDA, when fla is installed)
=================  ===========================================================================
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from .cases import Case

__all__ = ["Impl", "Prepared", "IMPLS", "Unavailable", "Unsupported", "make_inputs", "torch_dtype", "prepare"]


class Unavailable(RuntimeError):
    """The implementation cannot be imported here (a peer not installed, a module not written yet)."""


class Unsupported(RuntimeError):
    """The implementation exists but cannot serve this case (its reason is the message)."""


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``."""
    return getattr(torch, name)


@dataclass
class Prepared:
    """A ready call: ``fn()`` → output (B, Hq, Nq, Dv); ``context()`` wraps every call."""

    fn: Callable[[], torch.Tensor]
    context: Callable[[], ContextManager] = contextlib.nullcontext
    setup_ms: float | None = None
    check: str = "reference"  # "reference" (exact softmax), "linear-elu", or "finite" (approximate)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Impl:
    """One implementation: a name, a label for tables, whether it is exact, and a builder.

    ``build(case, q, k, v) -> Prepared`` raises :class:`Unavailable` or :class:`Unsupported`.
    """

    name: str
    label: str
    exact: bool
    build: Callable[[Case, torch.Tensor, torch.Tensor, torch.Tensor], Prepared]
    devices: tuple[str, ...] = ("cpu", "cuda")


def make_inputs(case: Case, *, requires_grad: bool = False, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q (B, Hq, Nq, D), k, v (B, Hkv, N, D) for a case, standard normal.

    Example:
        >>> q, k, v = make_inputs(Case("naive", 16, d=8, heads=2))
        >>> tuple(q.shape), tuple(k.shape)
        ((1, 2, 16, 8), (1, 2, 16, 8))
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = torch_dtype(case.dtype)
    shapes = ((case.batch, case.heads, case.q_len, case.d), (case.batch, case.hkv, case.n, case.d),
              (case.batch, case.hkv, case.n, case.d))
    out = []
    for shp in shapes:
        if case.device == "cpu":
            t = torch.randn(shp, generator=g, dtype=torch.float32).to(dt)
        else:  # generate on the device: host generation of GiBs is slow
            gd = torch.Generator(device=case.device).manual_seed(seed + len(out))
            t = torch.randn(shp, generator=gd, device=case.device, dtype=dt)
        out.append(t.requires_grad_(requires_grad))
    return out[0], out[1], out[2]


def _pattern(case: Case):
    spec = case.pattern_spec
    if spec is None:
        return None
    try:
        return spec.build(case.n)
    except NotImplementedError as e:
        raise Unavailable(str(e)) from None


def _dense_allowed(case: Case, device: torch.device) -> torch.Tensor | None:
    """bool (Nq, Nk) mask, True = attend (pattern ∧ causal, bottom-right aligned); None = all."""
    pat = _pattern(case)
    nq, nk = case.q_len, case.n
    if pat is None and not case.causal:
        return None
    m = None
    if pat is not None:
        m = pat.dense(nq, nk).to(device)
    if case.causal:
        c = torch.ones(nq, nk, dtype=torch.bool, device=device).tril(diagonal=nk - nq)
        m = c if m is None else (m & c)
    return m


# --------------------------------------------------------------------------- memattn
def _build_memattn(case: Case, q, k, v) -> Prepared:
    import memattn

    pat = _pattern(case)
    backend = case.backend
    if backend == "auto":
        backend = "triton" if case.device == "cuda" else "cpu"
    try:
        importlib.import_module(memattn.api.BACKENDS[backend])
    except ImportError as e:
        raise Unavailable(f"memattn backend {backend!r} not importable: {e}") from None
    causal = case.causal and not case.is_decode  # one query at the last position sees every key

    def fn():
        return memattn.attention(q, k, v, pattern=pat, causal=causal, backend=backend)
    return Prepared(fn)


# ----------------------------------------------------------------------------- naive
def _build_naive(case: Case, q, k, v) -> Prepared:
    scale = case.d ** -0.5
    g = case.heads // case.hkv
    pat = _pattern(case)
    nq, nk = case.q_len, case.n
    causal = case.causal and not case.is_decode

    def fn():
        kk = k.repeat_interleave(g, dim=1) if g > 1 else k
        vv = v.repeat_interleave(g, dim=1) if g > 1 else v
        s = torch.matmul(q, kk.transpose(-1, -2)) * scale
        if pat is not None or causal:
            # built per call, as a user's module does; the bool mask is 1 byte per pair
            m = pat.dense(nq, nk).to(q.device) if pat is not None else None
            if causal:
                c = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
                m = c if m is None else m & c
            s = s.masked_fill(~m, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, vv)
    return Prepared(fn)


# ------------------------------------------------------------------------------ SDPA
_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                  "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def _build_sdpa(case: Case, q, k, v, which: str | None = None) -> Prepared:
    import torch.nn.functional as F

    ctx: Callable[[], ContextManager] = contextlib.nullcontext
    if which is not None:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as e:  # pragma: no cover - torch < 2.3
            raise Unavailable(f"torch.nn.attention.sdpa_kernel missing: {e}") from None
        be = getattr(SDPBackend, _SDPA_BACKENDS[which], None)
        if be is None:
            raise Unavailable(f"this torch has no SDPBackend.{_SDPA_BACKENDS[which]}")
        if case.device != "cuda" and which != "sdpa-math":
            raise Unsupported(f"{which} is a CUDA kernel")
        ctx = lambda: sdpa_kernel([be])  # noqa: E731
    kwargs: dict = {}
    if case.heads != case.hkv:
        kwargs["enable_gqa"] = True
    nq, nk = case.q_len, case.n
    causal = case.causal and not case.is_decode
    mask = None
    if case.pattern is not None:
        mask = _dense_allowed(case, q.device)  # SDPA takes a dense bool mask: O(N²) bytes
    elif causal and nq != nk:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
    elif causal:
        kwargs["is_causal"] = True

    def fn():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    return Prepared(fn, context=ctx)


# ------------------------------------------------------------------------------ flex
_FLEX_CACHE: dict = {}


def _flex_mask_mod(case: Case):
    """A FlexAttention mask_mod (b, h, q_idx, kv_idx) → bool for the case, or None (all pairs)."""
    off = case.n - case.q_len
    spec = case.pattern_spec
    causal = case.causal and not case.is_decode
    if spec is None and not causal:
        return None
    if spec is None:
        def causal_mod(b, h, q_idx, kv_idx):
            return q_idx + off >= kv_idx
        return causal_mod
    if spec.name == "sliding_window" and len(spec.args) in (1, 2):
        left = spec.args[0]
        right = spec.args[1] if len(spec.args) == 2 else 0
        right = 0 if causal else right

        def window_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            return (d <= left) & (d >= -right)
        return window_mod
    if spec.name == "documents":
        (k,) = spec.args or (1,)
        base, rem = divmod(case.n, k)
        lengths = torch.tensor([base + (1 if i < rem else 0) for i in range(k)])
        doc_id = torch.repeat_interleave(torch.arange(k), lengths).to(case.device)

        def doc_mod(b, h, q_idx, kv_idx):
            same = doc_id[q_idx + off] == doc_id[kv_idx]
            return (same & (q_idx + off >= kv_idx)) if causal else same
        return doc_mod
    pat = _pattern(case)  # generic: the pattern's own vectorised predicate

    def pattern_mod(b, h, q_idx, kv_idx):
        m = pat.mask(b, h, q_idx + off, kv_idx)
        return (m & (q_idx + off >= kv_idx)) if causal else m
    return pattern_mod


def _build_flex(case: Case, q, k, v) -> Prepared:
    if case.device != "cuda":
        raise Unsupported("FlexAttention is measured on CUDA only (compiling it on the CPU takes minutes)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.flex_attention missing: {e}") from None
    import time

    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):  # one compiled kernel per shape in a suite
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    compiled = _FLEX_CACHE.get("fn")
    if compiled is None:
        compiled = _FLEX_CACHE["fn"] = torch.compile(flex_attention, dynamic=False)
    mod = _flex_mask_mod(case)
    block_mask = None
    setup_ms = None
    if mod is not None:
        def build():
            return create_block_mask(mod, B=None, H=None, Q_LEN=case.q_len, KV_LEN=case.n,
                                     device=q.device, _compile=True)
        block_mask = build()  # first call compiles the mask builder
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = build()
        torch.cuda.synchronize()
        setup_ms = (time.perf_counter() - t0) * 1e3
    kwargs = {"enable_gqa": True} if case.heads != case.hkv else {}

    def fn():
        return compiled(q, k, v, block_mask=block_mask, **kwargs)
    return Prepared(fn, setup_ms=setup_ms, notes=["mask build timed apart"] if setup_ms else [])


# ------------------------------------------------------------------------ approximate
def _approx(name: str):
    try:
        mod = importlib.import_module("memattn.approx")
        return getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"memattn.approx.{name} is not available yet ({type(e).__name__})") from None


def _build_linear(case: Case, q, k, v) -> Prepared:
    fn_ = _approx("linear_attention")
    if case.pattern is not None:
        raise Unsupported("linear attention takes no pattern")
    causal = case.causal and not case.is_decode

    def fn():
        return fn_(q, k, v, feature_map="elu", causal=causal)
    return Prepared(fn, check="linear-elu")


def _build_performer(case: Case, q, k, v) -> Prepared:
    attn = _approx("performer_attention")
    proj_fn = _approx("favor_projection")
    if case.pattern is not None:
        raise Unsupported("Performer takes no pattern")
    g = torch.Generator(device="cpu").manual_seed(0)
    proj = proj_fn(case.d, 256, generator=g).to(device=q.device, dtype=q.dtype)
    causal = case.causal and not case.is_decode

    def fn():
        return attn(q, k, v, projection=proj, causal=causal)
    return Prepared(fn, check="finite")


def _build_fla(case: Case, q, k, v) -> Prepared:
    if case.device != "cuda":
        raise Unsupported("fla kernels run on CUDA only")
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as e:
        raise Unavailable(f"fla not installed ({e})") from None
    if not case.causal or case.pattern is not None or case.heads != case.hkv:
        raise Unsupported("fla chunk_linear_attn is causal, without pattern or GQA")
    # fla takes (B, T, H, D); feature map elu+1 applied here, as linear_attention does
    qf = (torch.nn.functional.elu(q) + 1).transpose(1, 2).contiguous().detach().requires_grad_(q.requires_grad)
    kf = (torch.nn.functional.elu(k) + 1).transpose(1, 2).contiguous().detach().requires_grad_(k.requires_grad)
    vt = v.transpose(1, 2).contiguous().detach().requires_grad_(v.requires_grad)

    def fn():
        o = chunk_linear_attn(qf, kf, vt, normalize=True)
        o = o[0] if isinstance(o, tuple) else o
        return o.transpose(1, 2)
    return Prepared(fn, check="finite", notes=["fla: elu+1 applied outside the timed call"])


IMPLS: dict[str, Impl] = {
    "memattn": Impl("memattn", "memattn", True, _build_memattn),
    "naive": Impl("naive", "naive", True, _build_naive),
    "sdpa": Impl("sdpa", "SDPA", True, lambda c, q, k, v: _build_sdpa(c, q, k, v)),
    "sdpa-flash": Impl("sdpa-flash", "SDPA flash", True, lambda c, q, k, v: _build_sdpa(c, q, k, v, "sdpa-flash"),
                       ("cuda",)),
    "sdpa-cudnn": Impl("sdpa-cudnn", "SDPA cuDNN", True, lambda c, q, k, v: _build_sdpa(c, q, k, v, "sdpa-cudnn"),
                       ("cuda",)),
    "sdpa-efficient": Impl("sdpa-efficient", "SDPA efficient", True,
                           lambda c, q, k, v: _build_sdpa(c, q, k, v, "sdpa-efficient"), ("cuda",)),
    "sdpa-math": Impl("sdpa-math", "SDPA math", True, lambda c, q, k, v: _build_sdpa(c, q, k, v, "sdpa-math")),
    "flex": Impl("flex", "FlexAttention", True, _build_flex, ("cuda",)),
    "linear": Impl("linear", "linear (elu+1)", False, _build_linear),
    "performer": Impl("performer", "Performer", False, _build_performer),
    "fla-linear": Impl("fla-linear", "fla linear", False, _build_fla, ("cuda",)),
}


def impl_label(case: Case) -> str:
    """Table label: ``memattn[cpu]``, ``SDPA cuDNN``, ``memattn[triton] sliding_window:1024`` ..."""
    impl = IMPLS.get(case.impl)
    label = impl.label if impl else case.impl
    if case.impl == "memattn":
        be = case.backend if case.backend != "auto" else ("triton" if case.device == "cuda" else "cpu")
        label = f"memattn[{be}]"
    return label


def prepare(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Prepared:
    """Build the call for a case.

    Raises:
        ValueError: unknown implementation.
        Unavailable / Unsupported: as their names say.
    """
    impl = IMPLS.get(case.impl)
    if impl is None:
        raise ValueError(f"impl must be one of {sorted(IMPLS)}, got {case.impl!r}")
    if case.device not in impl.devices:
        raise Unsupported(f"{case.impl} runs on {', '.join(impl.devices)} only")
    return impl.build(case, q, k, v)

