"""Quality of every mechanism: drop-in on real pretrained models, approximation error on
real attention inputs, and trainable long-range tasks (``memattn eval``).

Modules: :mod:`.data` (offline models and text), :mod:`.tasks` (MQAR and ListOps
generators), :mod:`.variants` (what is compared), :mod:`.dropin`, :mod:`.approx_error`,
:mod:`.train`, :mod:`.report`, :mod:`.cli` (``main(argv)``). Nothing heavy is imported here.
"""

__all__ = ["data", "tasks", "variants", "dropin", "approx_error", "train", "report", "cli"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'memattn.eval' has no attribute {name!r}")
