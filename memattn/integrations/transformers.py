"""memattn inside Hugging Face transformers: one ``register`` call, then ``attn_implementation=name``.

transformers (>= 4.48, written against 5.x) looks attention up by name in two registries:
``AttentionInterface`` (the function every attention layer calls with q, k, v in
(B, H, N, D) layout) and ``AttentionMaskInterface`` (the function that turns the 2-D
padding mask into whatever that attention function expects). :func:`register` puts a
memattn function in both, so the model's mask reaches memattn in O(N) form:

* the mask function returns a :class:`MemattnMask` (the kind of mask — causal,
  bidirectional or a model-specific predicate —, its offsets and a (B, Nk) key-padding
  vector), never an (N, N) array;
* the attention function turns that into a memattn pattern (``causal()``, key padding, the
  model's own predicate when it is neither causal nor bidirectional) intersected with the
  user's pattern, and calls :func:`memattn.attention` with the key/value heads as they come
  (GQA without ``repeat_kv``), or one of the training-free approximate mechanisms.

Positions follow memattn's rule (design.md §3): key j sits at position j of the key/value
tensor the layer receives (the cache, left padding included), query i at ``i + Nk - Nq``
(bottom-right: a decoding query sits on the last cached position). A user pattern is
written in those positions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..api import BACKENDS, attention as _memattn_attention
from ..patterns import Pattern, causal as _causal, sliding_window as _sliding_window

__all__ = ["register", "unregister", "registered", "MemattnMask", "Settings", "TRAINING_FREE", "attention_forward",
           "mask_forward"]

# Mechanisms that reuse a pretrained model's q, k, v as they are (no new weights), with
# their options and defaults. Every other catalogue mechanism needs trained parameters.
TRAINING_FREE: dict[str, dict[str, Any]] = {
    "exact": {},
    "linear": {"feature_map": "elu", "eps": 1e-6},
    "performer": {"num_features": 256, "seed": 0, "orthogonal": True},
    "nystrom": {"num_landmarks": 64, "pinv_iterations": 6},
    "pooled": {"pool": "avg", "stride": 2},
}
# Mechanisms able to apply causality (a decoder can use them).
_CAUSAL_CAPABLE = ("exact", "linear", "performer", "pooled")
# Names transformers treats specially (built-ins and substrings it dispatches on).
_RESERVED = ("eager", "sdpa", "flash", "flex", "paged", "kernels")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# What this module registered: name -> settings (for ``registered`` and ``unregister``).
_REGISTRY: dict[str, dict[str, Any]] = {}


# ----------------------------------------------------------------------------------------------
# Predicates of the model's own masks (positions as in design.md §3)
# ----------------------------------------------------------------------------------------------
def _hf_predicate(fn: Callable, q_shift: int, kv_shift: int, device: torch.device) -> Callable:
    """transformers' ``fn(batch_idx, head_idx, q_idx, kv_idx)`` on memattn positions.

    transformers indexes queries from ``q_offset`` and keys from ``kv_offset``; memattn puts
    query i at ``i + nk - nq`` and key j at j, so ``q_idx = q_pos + q_shift`` with
    ``q_shift = q_offset - (nk - nq)``, and ``kv_idx = kv_pos + kv_offset``."""

    def hf_mask(b, h, q_pos, kv_pos):
        q_pos = torch.as_tensor(q_pos)
        kv_pos = torch.as_tensor(kv_pos)
        out = fn(torch.as_tensor(b).to(device), torch.as_tensor(h).to(device), q_pos.to(device) + q_shift,
                 kv_pos.to(device) + kv_shift)
        out = torch.as_tensor(out, dtype=torch.bool).to(q_pos.device)
        return torch.broadcast_to(out, torch.broadcast_shapes(out.shape, q_pos.shape, kv_pos.shape))

    hf_mask.__name__ = f"hf_{getattr(fn, '__name__', 'mask')}"
    return hf_mask


def _dense_predicate(mask: torch.Tensor) -> Callable:
    """A given bool (B or 1, H or 1, Nq, Nk) mask as a predicate on memattn positions."""
    nq, nk = mask.shape[-2], mask.shape[-1]

    def dense_mask(b, h, q_pos, kv_pos):
        q_pos = torch.as_tensor(q_pos)
        dev = q_pos.device
        m = mask.to(dev)
        bb = torch.as_tensor(b, device=dev) if m.shape[0] > 1 else torch.zeros((), dtype=torch.int64, device=dev)
        hh = torch.as_tensor(h, device=dev) if m.shape[1] > 1 else torch.zeros((), dtype=torch.int64, device=dev)
        return m[bb, hh, q_pos - (nk - nq), torch.as_tensor(kv_pos, device=dev)]

    return dense_mask


# ----------------------------------------------------------------------------------------------
# The mask object the model passes to every layer
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MemattnMask:
    """The model's attention mask in O(N) form, built once per forward by the mask function.

    Attributes:
        kind: "causal", "bidirectional" or "custom" (``mask_function`` decides).
        batch_size, q_length, kv_length: the sizes it was built for.
        q_offset, kv_offset: transformers' index of the first query / key.
        key_valid: bool (B, kv_length), True for a real key; None when every key is real.
        mask_function: transformers' element predicate ``fn(b, h, q_idx, kv_idx)``
            (only used when ``kind == "custom"``).
        device: where the model's tensors live.
    """

    kind: str
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    key_valid: torch.Tensor | None
    mask_function: Callable | None
    device: torch.device
    _patterns: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, 1, Nq, Nk), the shape of the dense mask it stands for (for code that inspects it)."""
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @property
    def is_causal_aligned(self) -> bool:
        """Causal in transformers' indices equals memattn's bottom-right causal rule."""
        return self.q_offset - (self.kv_length - self.q_length) - self.kv_offset == 0

    def pattern_for(self, user: Pattern | None) -> Pattern | None:
        """The memattn pattern of this mask (the model's rule & key padding & ``user``); cached,
        so every layer of one forward reuses one pattern object (and its block map).

        Args:
            user: the pattern given to :func:`register`, or None.
        Returns:
            a Pattern, or None when every pair is allowed.
        """
        key = id(user)
        if key in self._patterns:
            return self._patterns[key][0]
        from ..nn.padding import key_padding
        from ..patterns import from_mask_mod

        parts: list[Pattern] = []
        if self.kind == "causal" and self.is_causal_aligned:
            parts.append(_causal())
        elif self.kind in ("causal", "custom"):
            fn = self.mask_function
            if self.kind == "causal":
                from transformers.masking_utils import causal_mask_function as fn  # noqa: N813
            pred = _hf_predicate(fn, self.q_offset - (self.kv_length - self.q_length), self.kv_offset,
                                 torch.device(self.device))
            parts.append(from_mask_mod(pred, batch_size=self.batch_size))
        if self.key_valid is not None:
            parts.append(key_padding(self.key_valid))
        if user is not None:
            parts.append(user)
        pat = None
        for p in parts:
            pat = p if pat is None else pat & p
        self._patterns[key] = (pat, user)  # keeps ``user`` alive, so its id stays unique
        return pat


def mask_forward(batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = 0,
                 kv_offset: int = 0, mask_function: Callable | None = None,
                 attention_mask: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 **kwargs: Any) -> MemattnMask:
    """The mask function registered in transformers' ``AttentionMaskInterface``.

    transformers calls it with the sizes of the coming attention call and the 2-D padding
    mask; it returns a :class:`MemattnMask` (O(B·Nk) memory) instead of a (B, 1, Nq, Nk) array.

    Args:
        batch_size, q_length, kv_length: sizes of the attention call.
        q_offset, kv_offset: index of the first query / key (cache positions).
        mask_function: transformers' predicate (``causal_mask_function``,
            ``bidirectional_mask_function`` or a composed one).
        attention_mask: bool (B, seen + q_length) with True for real tokens, or None.
        device: device of the model's tensors.
        **kwargs: other arguments transformers passes (``dtype``, ``config``, ``local_size``,
            ``allow_is_causal_skip``, ``use_vmap``...), unused.
    Returns:
        MemattnMask.

    Example:
        >>> m = mask_forward(2, 5, 5, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
        >>> m.kind, m.key_valid.tolist()[1]
        ('causal', [True, True, True, False, False])
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is None or mask_function is causal_mask_function:
        kind = "causal"
    elif mask_function is bidirectional_mask_function:
        kind = "bidirectional"
    else:
        kind = "custom"
    q_offset = int(q_offset)
    kv_offset = int(kv_offset)
    key_valid = None
    if attention_mask is not None:
        am = attention_mask.to(torch.bool)
        if am.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D (batch, keys), got shape {tuple(am.shape)}")
        need = kv_length + kv_offset
        if am.shape[1] < need:  # a static cache longer than what was seen: the rest is empty
            am = torch.nn.functional.pad(am, (0, need - am.shape[1]), value=False)
        am = am[:, kv_offset:kv_offset + kv_length]
        if am.shape[0] == 1 and batch_size > 1:
            am = am.expand(batch_size, -1)
        if not bool(am.all()):
            key_valid = am
    return MemattnMask(kind, int(batch_size), int(q_length), int(kv_length), q_offset, kv_offset, key_valid,
                       mask_function, torch.device(device))


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What :func:`register` was given (validated): the attention function is bound to it."""

    pattern: Pattern | None
    mechanism: str
    backend: str
    options: dict


def _mask_from_tensor(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool) -> MemattnMask | torch.Tensor:
    """A tensor mask given directly by the caller: 2-D key padding, or 4-D boolean / additive."""
    B, _, Nq, _ = q.shape
    Nk = k.shape[2]
    if mask.dim() == 2:
        if mask.shape != (B, Nk):
            raise ValueError(f"a 2-D attention_mask must have shape (B, Nk) = {(B, Nk)}, got {tuple(mask.shape)}")
        valid = mask.to(torch.bool)
        return MemattnMask("causal" if causal else "bidirectional", B, Nq, Nk, Nk - Nq, 0,
                           None if bool(valid.all()) else valid, None, q.device)
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be None, 2-D (B, Nk) or 4-D (B, H, Nq, Nk), got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise TypeError(f"a 4-D attention_mask must be bool or floating (additive), got {mask.dtype}")
        lowest = torch.finfo(mask.dtype).min / 2
        allowed = mask == 0
        blocked = mask <= lowest
        if not bool((allowed | blocked).all()):
            raise NotImplementedError("memattn takes masks, not additive biases: this attention_mask holds values "
                                      "other than 0 and -inf/finfo.min (a position bias?)")
        mask = allowed
    if mask.shape[-2:] != (Nq, Nk) or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, q.shape[1]):
        raise ValueError(f"a 4-D attention_mask must broadcast to (B, H, Nq, Nk) = {(B, q.shape[1], Nq, Nk)}, "
                         f"got {tuple(mask.shape)}")
    return mask


def _resolve_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    if is_causal is not None:
        return bool(is_causal)
    return bool(getattr(module, "is_causal", True))


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None, **common: Any) -> torch.Tensor:
    return _memattn_attention(q, k, v, pattern=pattern, **common)


def _exact(settings: Settings, module, q, k, v, mask, dropout, scaling, is_causal, kwargs) -> torch.Tensor:
    B, Hq, Nq, _ = q.shape
    common = dict(scale=scaling, softcap=float(kwargs.get("softcap") or 0.0), dropout_p=float(dropout or 0.0),
                  backend=settings.backend)
    user = settings.pattern
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        from ..patterns import from_mask_mod

        m = mask.detach().to(torch.bool)
        pat = from_mask_mod(_dense_predicate(m), num_heads=Hq if m.shape[1] > 1 else None,
                            batch_size=B if m.shape[0] > 1 else 1)
        return _call(q, k, v, pat if user is None else pat & user, **common)
    if mask is None:
        causal = _resolve_causal(module, is_causal)
        Nk = k.shape[2]
        if causal and 1 < Nq < Nk:
            # As SDPA: without a mask, a causal prefill against a longer (static, empty) cache
            # keeps the first Nq keys (top-left alignment).
            k, v = k[:, :, :Nq], v[:, :, :Nq]
        pat = user
        window = kwargs.get("sliding_window")
        if window is not None and causal:
            w = _sliding_window(int(window) - 1)
            pat = w if pat is None else pat & w
        return _call(q, k, v, pat, causal=causal, **common)
    if mask.q_length != Nq or mask.kv_length != k.shape[2] or mask.batch_size != B:
        raise ValueError(f"the attention mask was built for (B, Nq, Nk) = ({mask.batch_size}, {mask.q_length}, "
                         f"{mask.kv_length}) but the layer got ({B}, {Nq}, {k.shape[2]})")
    return _call(q, k, v, mask.pattern_for(user), **common)


_PROJECTIONS: dict[tuple, torch.Tensor] = {}


def _approx_call(settings: Settings, q, k, v, causal: bool, scale: float | None,
                 key_valid: torch.Tensor | None) -> torch.Tensor:
    """One call of a training-free approximate mechanism (GQA, padding and bottom-right
    causal alignment are handled by memattn.approx itself)."""
    from .. import approx

    o = settings.options
    km = None if key_valid is None else key_valid.to(q.device)
    head_dim = q.shape[-1]
    if settings.mechanism == "linear":
        # A kernel feature map has no temperature: the score scale does not apply.
        return approx.linear_attention(q, k, v, feature_map=o["feature_map"], causal=causal, eps=o["eps"],
                                       key_padding_mask=km)
    if settings.mechanism == "performer":
        if scale is not None and not math.isclose(float(scale), head_dim ** -0.5, rel_tol=1e-6):
            q = q * (float(scale) * head_dim ** 0.5)  # FAVOR+ estimates exp(q·k / sqrt(D))
        key = (head_dim, o["num_features"], o["seed"], o["orthogonal"], q.device, q.dtype)
        proj = _PROJECTIONS.get(key)
        if proj is None:
            gen = torch.Generator().manual_seed(int(o["seed"]))
            proj = approx.favor_projection(head_dim, int(o["num_features"]), orthogonal=bool(o["orthogonal"]),
                                           generator=gen, dtype=q.dtype, device=q.device)
            _PROJECTIONS[key] = proj
        return approx.performer_attention(q, k, v, projection=proj, causal=causal, key_padding_mask=km)
    if settings.mechanism == "nystrom":
        return approx.nystrom_attention(q, k, v, num_landmarks=int(o["num_landmarks"]),
                                        pinv_iterations=int(o["pinv_iterations"]), scale=scale, key_padding_mask=km)
    if settings.mechanism == "pooled":
        return approx.pooled_attention(q, k, v, pool=o["pool"], stride=int(o["stride"]), causal=causal, scale=scale,
                                       key_padding_mask=km)
    raise AssertionError(settings.mechanism)


def _approximate(settings: Settings, module, q, k, v, mask, dropout, scaling, is_causal, kwargs) -> torch.Tensor:
    name = settings.mechanism
    if kwargs.get("softcap"):
        raise NotImplementedError(f"mechanism {name!r} has no softcap; use mechanism='exact'")
    if dropout:
        raise NotImplementedError(f"mechanism {name!r} has no attention dropout; call model.eval() or set the "
                                  "model's attention dropout to 0")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        raise NotImplementedError(f"mechanism {name!r} cannot apply a dense 4-D attention_mask; use 'exact'")
    if mask is None:
        causal = _resolve_causal(module, is_causal)
        key_valid = None
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(f"mechanism {name!r} cannot apply a sliding window; use 'exact'")
    else:
        if mask.kind == "custom" or (mask.kind == "causal" and not mask.is_causal_aligned):
            raise NotImplementedError(f"mechanism {name!r} applies causal or bidirectional masks with padding only; "
                                      "this model builds another mask (sliding window, chunks, packing, a static "
                                      "cache...): use 'exact'")
        causal = mask.kind == "causal"
        key_valid = mask.key_valid
    if causal and name not in _CAUSAL_CAPABLE:
        raise NotImplementedError(f"mechanism {name!r} is not causal, so it cannot serve a decoder; "
                                  f"causal training-free mechanisms: {', '.join(_CAUSAL_CAPABLE)}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}) in a causal call")
    return _approx_call(settings, q, k, v, causal, scaling, key_valid)


def attention_forward(settings: Settings, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function registered in transformers (bound to ``settings`` by :func:`register`).

    Args:
        settings: what :func:`register` was given.
        module: the calling attention layer (``is_causal`` is read from it when needed).
        query: (B, Hq, Nq, D); key: (B, Hkv, Nk, D); value: (B, Hkv, Nk, Dv), Hq % Hkv == 0.
        attention_mask: a :class:`MemattnMask` (from :func:`mask_forward`), None, a (B, Nk)
            key-padding tensor, or a 4-D boolean / additive (0 or -inf) mask.
        dropout: attention dropout probability (training).
        scaling: score scale (default D ** -0.5).
        is_causal: overrides ``module.is_causal`` when the mask is None.
        **kwargs: ``softcap``, ``sliding_window`` are honoured; ``position_bias`` and ``s_aux``
            (learned sinks) raise; the rest is ignored.
    Returns:
        ((B, Nq, Hq, Dv) contiguous, None) — attention weights are never materialised.
    """
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("memattn does not add position biases (T5-style); use 'sdpa' or 'eager' here")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("memattn does not support learned attention sinks (s_aux)")
    mask = attention_mask
    if isinstance(mask, torch.Tensor):
        mask = _mask_from_tensor(mask, query, key, _resolve_causal(module, is_causal))
    elif mask is not None and not isinstance(mask, MemattnMask):
        raise TypeError(f"attention_mask must be a MemattnMask, a tensor or None, got {type(mask).__name__} "
                        "(was the model's mask built for another attn_implementation?)")
    fn = _exact if settings.mechanism == "exact" else _approximate
    out = fn(settings, module, query, key, value, mask, dropout, scaling, is_causal, kwargs)
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def _mechanism_options(mechanism: str, options: dict) -> dict:
    if not isinstance(mechanism, str):
        raise TypeError(f"mechanism must be a str, got {type(mechanism).__name__}")
    if mechanism not in TRAINING_FREE:
        known: list[str] = []
        try:
            from ..mechanisms import catalog

            known = list(catalog())
        except (ImportError, AttributeError):
            pass
        if mechanism in known:
            raise ValueError(f"mechanism {mechanism!r} needs weights a pretrained model does not have (it must be "
                             f"trained); the training-free mechanisms are {', '.join(TRAINING_FREE)}")
        raise ValueError(f"unknown mechanism {mechanism!r}; the training-free mechanisms are {', '.join(TRAINING_FREE)}")
    defaults = TRAINING_FREE[mechanism]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for mechanism {mechanism!r} (allowed: {allowed})")
    merged = {**defaults, **options}
    if mechanism == "performer" and (not isinstance(merged["num_features"], int) or merged["num_features"] < 1):
        raise ValueError(f"num_features must be a positive int, got {merged['num_features']!r}")
    if mechanism == "nystrom" and (not isinstance(merged["num_landmarks"], int) or merged["num_landmarks"] < 1):
        raise ValueError(f"num_landmarks must be a positive int, got {merged['num_landmarks']!r}")
    if mechanism == "pooled" and (not isinstance(merged["stride"], int) or merged["stride"] < 1):
        raise ValueError(f"stride must be a positive int, got {merged['stride']!r}")
    return merged


def register(name: str = "memattn", *, pattern: Pattern | None = None, mechanism: str = "exact",
             backend: str = "auto", **options: Any) -> str:
    """Register memattn in transformers under ``name``; every attention layer then runs through it.

    After ``register``, ``model.set_attn_implementation(name)`` or
    ``from_pretrained(..., attn_implementation=name)`` routes all attention through memattn:
    padding masks (boolean or additive) are applied as O(N) key padding, a causal model gets
    causality, GQA key/value heads are used without repeating them, decoding with a KV cache
    puts the query on the last cached position, ``pattern`` is intersected with the model's
    own mask, and the output is (B, N, H, D) as transformers expects.

    Args:
        name: the ``attn_implementation`` name ([A-Za-z0-9_.-]+, not a transformers built-in
            nor containing "sdpa", "flash", "flex", "eager", "paged", "kernels").
        pattern: a :class:`memattn.patterns.Pattern` intersected with the model's mask in every
            layer (exact mechanism only). Positions: key j at j (cache index), query i at
            ``i + Nk - Nq``.
        mechanism: "exact" (default) or a mechanism that needs no new weights: "linear"
            (options ``feature_map``, ``eps``), "performer" (``num_features``, ``seed``,
            ``orthogonal``), "nystrom" (``num_landmarks``, ``pinv_iterations``; not causal),
            "pooled" (``pool``, ``stride``; causal-safe form for decoders).
        backend: memattn backend for the exact mechanism: "auto", "cpu", "triton", "reference".
        **options: the mechanism's options (defaults in :data:`TRAINING_FREE`).
    Returns:
        name.
    Raises:
        ValueError: a bad name, an unknown mechanism, one that needs trained weights
            (Linformer, Synthesizer...), a pattern with an approximate mechanism.
        TypeError: an option the mechanism does not take, a pattern that is not a Pattern.
        ImportError: transformers is not installed.

    Example:
        >>> import memattn.integrations.transformers as mt
        >>> from memattn import patterns
        >>> mt.register("memattn-window", pattern=patterns.sliding_window(255))
        'memattn-window'
        >>> # model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="memattn-window")
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be a non-empty str of letters, digits, '_', '.', '-', got {name!r}")
    if any(r in name.lower() for r in _RESERVED):
        raise ValueError(f"name {name!r} collides with transformers' own implementations; pick another")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a memattn.patterns.Pattern or None, got {type(pattern).__name__}")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    opts = _mechanism_options(mechanism, options)
    if pattern is not None and mechanism != "exact":
        raise ValueError(f"a pattern applies to the exact mechanism only, not to {mechanism!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("memattn.integrations.transformers needs transformers: pip install 'memattn[eval]'") from e
    settings = Settings(pattern, mechanism, backend, opts)

    def memattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
        return attention_forward(settings, module, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, is_causal=is_causal, **kwargs)

    memattn_attention.__name__ = memattn_attention.__qualname__ = f"memattn_attention[{name}]"
    memattn_attention.settings = settings  # type: ignore[attr-defined]
    AttentionInterface.register(name, memattn_attention)
    AttentionMaskInterface.register(name, mask_forward)
    _REGISTRY[name] = {"pattern": pattern, "mechanism": mechanism, "backend": backend, "options": opts}
    return name


def unregister(name: str) -> None:
    """Remove a name this module registered from both transformers registries.

    Args:
        name: a name returned by :func:`register`.
    Raises:
        KeyError: the name was not registered by memattn.
    Example:
        >>> import memattn.integrations.transformers as mt
        >>> mt.unregister(mt.register("memattn-tmp"))
    """
    if name not in _REGISTRY:
        raise KeyError(f"{name!r} was not registered by memattn")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    del _REGISTRY[name]


def registered() -> dict[str, dict[str, Any]]:
    """The names this module registered, with their pattern, mechanism, backend and options.

    Example:
        >>> import memattn.integrations.transformers as mt
        >>> "memattn" in mt.registered() or True
        True
    """
    return {k: dict(v) for k, v in _REGISTRY.items()}
