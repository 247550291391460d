"""The catalogue of attention mechanisms: name → builder and properties.

Every name is accepted by :class:`memattn.nn.Attention` (``mechanism=name``), and every
option has a default, so ``Attention(64, 4, mechanism=name)`` works for each.

Example:
    >>> from memattn import mechanisms
    >>> info = mechanisms.catalog()["linformer"]
    >>> info.exact, info.memory, info.causal, info.params["rank"]
    (False, 'O(N·r)', False, 64)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

__all__ = ["MechanismInfo", "catalog", "names"]


@dataclass(frozen=True)
class MechanismInfo:
    """Properties of one mechanism.

    Attributes:
        name: the catalogue key.
        exact: True when the result is exact softmax attention (restricted to a pattern).
        memory: activation memory class in N (sequence length), e.g. "O(N)", "O(N·r)", "O(N²)".
        causal: whether ``causal=True`` is supported.
        backends: where it runs ("triton", "cpu", "reference" via memattn.attention; "pytorch").
        reference: the paper.
        summary: one line on what it computes.
        options: the typed options dataclass (its fields are the layer's mechanism options).
        core: the nn.Module class that :class:`memattn.nn.Attention` builds.
    """

    name: str
    exact: bool
    memory: str
    causal: bool
    backends: tuple[str, ...]
    reference: str
    summary: str
    options: type
    core: type

    @property
    def params(self) -> dict[str, Any]:
        """Option name → default."""
        return {f.name: f.default for f in dataclasses.fields(self.options)}


_EXACT_BACKENDS = ("triton", "cpu", "reference")


@functools.lru_cache(maxsize=1)
def _build() -> dict[str, MechanismInfo]:
    from .nn import cores_approx as ca
    from .nn import cores_exact as ce

    def exact(name, options, reference, summary):
        return MechanismInfo(name, True, "O(N)", True, _EXACT_BACKENDS, reference, summary, options, ce.PatternCore)

    entries = [
        exact("exact", ce.ExactOptions, "Vaswani et al. 2017; Dao et al. 2022 (FlashAttention)",
              "dense softmax attention, tiled with online softmax"),
        exact("window", ce.WindowOptions, "Beltagy et al. 2020; Child et al. 2019",
              "keys within ±window of the query"),
        exact("dilated", ce.DilatedOptions, "Beltagy et al. 2020 (dilated sliding window)",
              "every dilation-th key within ±window"),
        exact("strided", ce.StridedOptions, "Child et al. 2019 (Sparse Transformer, strided)",
              "keys at a multiple of stride, plus a local window"),
        exact("fixed", ce.FixedOptions, "Child et al. 2019 (Sparse Transformer, fixed)",
              "own block plus the summary keys of every block"),
        exact("exponential", ce.ExponentialOptions, "Li et al. 2019 (LogSparse Transformer)",
              "keys at power-of-two distances plus a local window"),
        exact("random", ce.RandomOptions, "Zaheer et al. 2020 (random attention)",
              "a fixed random set of keys per query"),
        exact("longformer", ce.LongformerOptions, "Beltagy et al. 2020 (Longformer)",
              "symmetric window plus global tokens"),
        exact("bigbird", ce.BigBirdOptions, "Zaheer et al. 2020 (BigBird)",
              "block window, global blocks and random blocks"),
        MechanismInfo("linear", False, "O(N)", True, ("pytorch", "triton"),
                      "Katharopoulos et al. 2020 (Transformers are RNNs)",
                      "kernel feature map φ: φ(q)·Σφ(k)vᵀ / φ(q)·Σφ(k); causal chunked with a carried state",
                      ca.LinearOptions, ca.LinearCore),
        MechanismInfo("performer", False, "O(N·m)", True, ("pytorch", "triton"),
                      "Choromanski et al. 2021 (Performer, FAVOR+)",
                      "positive orthogonal random features estimating the softmax kernel",
                      ca.PerformerOptions, ca.PerformerCore),
        MechanismInfo("linformer", False, "O(N·r)", False, ("pytorch",), "Wang et al. 2020 (Linformer)",
                      "keys and values projected along the sequence to rank r",
                      ca.LinformerOptions, ca.LinformerCore),
        MechanismInfo("nystrom", False, "O(N·m)", False, ("pytorch",), "Xiong et al. 2021 (Nyströmformer)",
                      "Nyström approximation through m segment-mean landmarks",
                      ca.NystromOptions, ca.NystromCore),
        MechanismInfo("synthesizer", False, "O(N²)", True, ("pytorch",), "Tay et al. 2021 (Synthesizer)",
                      "attention weights synthesised without dot products (dense / random / factorized)",
                      ca.SynthesizerOptions, ca.SynthesizerCore),
        MechanismInfo("pooled", False, "O(N²/s)", True, ("pytorch",),
                      "Dai et al. 2020 (Funnel Transformer); Rae et al. 2020 (Compressive Transformer)",
                      "keys/values (optionally queries) pooled over windows of stride s; causal-safe",
                      ca.PooledOptions, ca.PooledCore),
    ]
    return {e.name: e for e in entries}


def catalog() -> dict[str, MechanismInfo]:
    """Every mechanism name with its :class:`MechanismInfo` (a fresh dict; entries are immutable).

    Example:
        >>> from memattn.mechanisms import catalog
        >>> sorted(n for n, i in catalog().items() if not i.exact)
        ['linear', 'linformer', 'nystrom', 'performer', 'pooled', 'synthesizer']
    """
    return dict(_build())


def names() -> tuple[str, ...]:
    """The mechanism names, exact ones first."""
    return tuple(_build())
