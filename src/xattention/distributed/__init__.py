"""Context-parallel sparse prefill over ``torch.distributed``: the sequence is sharded across ranks in whole blocks,
K/V shards travel a ring, selection and attention give each rank exactly its rows of the single-device result.

See :mod:`.ring` for the algorithm and its communication, :mod:`.sharding` for the layouts.
"""

from __future__ import annotations

from .ring import PhaseStats, RingStats, attend_shard, ring_estimate, ring_sparse_attention
from .sharding import LAYOUTS, SequenceLayout, ShardBlockMask, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "PhaseStats",
    "RingStats",
    "SequenceLayout",
    "ShardBlockMask",
    "attend_shard",
    "ring_estimate",
    "ring_sparse_attention",
    "shard_sequence",
    "unshard_sequence",
]
