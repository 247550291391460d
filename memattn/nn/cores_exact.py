"""Exact mechanisms: :func:`memattn.attention` with a :mod:`memattn.patterns` pattern.

Each mechanism is an options dataclass whose ``pattern()`` builds the pattern; padding is
the intersection with a :class:`~memattn.nn.padding.KeyPadding` pattern; ``causal=True``
intersects with the causal pattern (bottom-right aligned, so decoding with a KV cache works).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import patterns
from ..api import attention
from .core import Core, check_option
from .padding import key_padding

__all__ = ["ExactOptions", "WindowOptions", "DilatedOptions", "StridedOptions", "FixedOptions",
           "ExponentialOptions", "RandomOptions", "LongformerOptions", "BigBirdOptions", "PatternCore"]

_BACKENDS = ("auto", "cpu", "triton", "reference")


@dataclass(frozen=True)
class ExactOptions:
    """Dense softmax attention. ``backend``: as in :func:`memattn.attention`; ``softcap`` > 0
    caps scores with softcap·tanh(s/softcap)."""

    backend: str = "auto"
    softcap: float = 0.0

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"option backend must be one of {_BACKENDS}, got {self.backend!r}")
        check_option("softcap", self.softcap, (int, float), minimum=0.0)

    def pattern(self) -> patterns.Pattern | None:
        return None


@dataclass(frozen=True)
class WindowOptions(ExactOptions):
    """Sliding window: keys with |i − j| <= window (with causal: the window's left half)."""

    window: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("window", self.window, int, minimum=0)

    def pattern(self):
        return patterns.sliding_window(self.window, self.window)


@dataclass(frozen=True)
class DilatedOptions(ExactOptions):
    """Dilated window: every ``dilation``-th key with |i − j| <= window."""

    window: int = 256
    dilation: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("window", self.window, int, minimum=0)
        check_option("dilation", self.dilation, int, minimum=1)

    def pattern(self):
        return patterns.dilated(self.window, self.dilation, right=self.window)


@dataclass(frozen=True)
class StridedOptions(ExactOptions):
    """Sparse Transformer strided: |i − j| a multiple of ``stride`` (an int or several), or <= window."""

    stride: int | tuple[int, ...] = 64
    window: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stride, list):
            object.__setattr__(self, "stride", tuple(self.stride))
        strides = self.stride if isinstance(self.stride, tuple) else (self.stride,)
        for s in strides:
            check_option("stride", s, int, minimum=1)
        check_option("window", self.window, int, minimum=0)

    def pattern(self):
        strides = self.stride if isinstance(self.stride, tuple) else (self.stride,)
        return patterns.strided(*strides, local=self.window)


@dataclass(frozen=True)
class FixedOptions(ExactOptions):
    """Sparse Transformer fixed: own block of ``block_size``, plus the last ``summary`` keys of every block."""

    block_size: int = 64
    summary: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("block_size", self.block_size, int, minimum=1)
        check_option("summary", self.summary, int, minimum=1)

    def pattern(self):
        return patterns.fixed(self.block_size, self.summary)


@dataclass(frozen=True)
class ExponentialOptions(ExactOptions):
    """LogSparse: keys at distance 0, 1, 2, 4, 8, … plus a local window."""

    window: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("window", self.window, int, minimum=0)

    def pattern(self):
        return patterns.exponential(local=self.window)


@dataclass(frozen=True)
class RandomOptions(ExactOptions):
    """``keys_per_query`` random keys per query (deterministic given ``seed``)."""

    keys_per_query: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("keys_per_query", self.keys_per_query, int, minimum=1)
        check_option("seed", self.seed, int, minimum=0)

    def pattern(self):
        return patterns.random(self.keys_per_query, seed=self.seed)


@dataclass(frozen=True)
class LongformerOptions(ExactOptions):
    """Longformer: symmetric window ±window//2 plus ``global_tokens`` attending to and attended by all."""

    window: int = 256
    global_tokens: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("window", self.window, int, minimum=0)
        if isinstance(self.global_tokens, list):
            object.__setattr__(self, "global_tokens", tuple(self.global_tokens))
        check_option("global_tokens", self.global_tokens, tuple)

    def pattern(self):
        return patterns.longformer(self.window, self.global_tokens)


@dataclass(frozen=True)
class BigBirdOptions(ExactOptions):
    """BigBird on blocks of ``block_size``: window, global and ``random_blocks`` random blocks."""

    block_size: int = 64
    window_blocks: int = 3
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("block_size", "window_blocks"):
            check_option(name, getattr(self, name), int, minimum=1)
        for name in ("global_blocks", "random_blocks", "seed"):
            check_option(name, getattr(self, name), int, minimum=0)

    def pattern(self):
        return patterns.bigbird(self.block_size, self.window_blocks, self.global_blocks, self.random_blocks,
                                seed=self.seed)


class PatternCore(Core):
    """Exact softmax attention restricted to the options' pattern, O(N) memory."""

    def __init__(self, spec, options: ExactOptions) -> None:
        super().__init__(spec, options)
        self.pattern = options.pattern()

    def forward(self, q, k, v, *, key_mask, causal):
        pattern = self.pattern
        if key_mask is not None and not bool(key_mask.all()):
            pad = key_padding(key_mask)
            pattern = pad if pattern is None else pattern & pad
        p = self.spec.dropout if self.training else 0.0
        return attention(q, k, v, pattern=pattern, causal=causal, softcap=self.options.softcap, dropout_p=p,
                         backend=self.options.backend)
