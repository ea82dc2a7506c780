"""Distributed attention over process groups (ring, allgather, ulysses, usp) and sequence sharding."""

from .api import gather_sequence, sequence_parallel_attention, shard_sequence

__all__ = ["gather_sequence", "sequence_parallel_attention", "shard_sequence"]
