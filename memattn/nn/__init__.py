"""nn.Module layers: :class:`Attention` (every mechanism of :mod:`memattn.mechanisms`), :class:`KVCache`."""

from .attention import Attention
from .kv_cache import KVCache
from .padding import KeyPadding, key_padding

__all__ = ["Attention", "KVCache", "KeyPadding", "key_padding"]
