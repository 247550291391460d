"""Integrations of memattn with other libraries.

* :mod:`memattn.integrations.transformers`: route every attention layer of a Hugging Face
  transformers model through memattn (``register`` + ``attn_implementation=name``).

Submodules are imported on use, so ``import memattn.integrations`` does not import
transformers.
"""

__all__ = ["transformers"]


def __getattr__(name: str):
    if name == "transformers":
        import importlib

        return importlib.import_module(".transformers", __name__)
    raise AttributeError(f"module 'memattn.integrations' has no attribute {name!r}")
