"""hf_seqpar: exact sequence parallelism (ring, all-gather, Ulysses, USP) for Hugging Face fine-tuning.

Importing has no side effects: nothing is registered or patched until you call `apply_sequence_parallel`.
"""

from .algorithms import gather_sequence, sequence_parallel_attention, shard_sequence
from .config import SeqParConfig
from .mesh import SeqParGroups, init_groups

__all__ = [
    "SeqParConfig",
    "SeqParGroups",
    "gather_sequence",
    "init_groups",
    "sequence_parallel_attention",
    "shard_sequence",
]
