"""Attention patterns: which (query, key) pairs may attend.

Every pattern is immutable and hashable and offers ``mask``, ``dense``, ``block_map`` and
``density``; ``p & q`` and ``p | q`` combine them. Positions are absolute (query i sits at
``i + nk - nq``). See docs/patterns.md for a picture of each.
"""

from .base import Intersection, Pattern, Union
from .blockmap import BlockCOO, BlockMap
from .local import causal, full, sliding_window
from .dilated import dilated
from .strided import strided
from .fixed import fixed
from .exponential import exponential
from .random import random
from .global_tokens import global_tokens
from .longformer import longformer
from .bigbird import bigbird
from .document import document
from .block_sparse import block_sparse
from .mask_mod import from_mask_mod

__all__ = [
    "Pattern", "BlockMap", "BlockCOO", "Intersection", "Union",
    "full", "causal", "sliding_window", "dilated", "strided", "fixed", "exponential", "random",
    "global_tokens", "longformer", "bigbird", "document", "block_sparse", "from_mask_mod",
]
