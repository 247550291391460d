"""Attention patterns: which (query, key) pairs may attend.

Every pattern is immutable and hashable and offers ``mask``, ``dense``, ``block_map`` and
``density``; ``p & q`` and ``p | q`` combine them. Positions are absolute (query i sits at
``i + nk - nq``). See docs/patterns.md for a picture of each.
"""

from .base import Intersection, Pattern, Union
from .blockmap import BlockCOO, BlockMap
from .local import causal, full, sliding_window

__all__ = [
    "Pattern", "BlockMap", "BlockCOO", "Intersection", "Union",
    "full", "causal", "sliding_window",
]
