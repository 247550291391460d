"""Scale-out attention over ``torch.distributed``: ring attention (zigzag or contiguous
sequence shards, key/value blocks passed round a ring) and Ulysses (all-to-all from
sequence shards to head shards). NCCL on GPUs, gloo on CPUs. See docs/distributed.md.

Every entry point checks shapes and options across ranks first; a rank that differs, dies
or stalls ends in an error within the process group's timeout
(``torch.distributed.init_process_group(timeout=...)``), never a silent hang.
"""

from .ring import RingPlan, RingStats, RingTask, last_ring_stats, plan_ring, ring_attention
from .sharding import LAYOUTS, layout_chunks, shard, shard_positions, unshard
from .ulysses import ulysses_attention

__all__ = [
    "ring_attention", "ulysses_attention", "shard", "unshard", "shard_positions", "layout_chunks", "LAYOUTS",
    "plan_ring", "RingPlan", "RingTask", "RingStats", "last_ring_stats",
]
