"""memattn: attention that fits.

Public names: :func:`attention`, :mod:`patterns`, :mod:`approx`, :mod:`nn`, :mod:`mechanisms`.
Nothing is compiled and no hardware is probed at import time.
"""

from . import patterns
from .api import attention

__version__ = "0.1.0"
__all__ = ["attention", "patterns", "approx", "nn", "mechanisms", "__version__"]


def __getattr__(name: str):
    # Lazy submodules: importing memattn stays light.
    if name in ("approx", "nn", "mechanisms", "distributed", "integrations", "bench", "eval"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'memattn' has no attribute {name!r}")
