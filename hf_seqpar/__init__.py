"""hf_seqpar: exact sequence parallelism (ring, all-gather, Ulysses, USP) for Hugging Face fine-tuning.

Importing has no side effects: nothing is registered or patched until you call `apply_sequence_parallel`, and
transformers / accelerate are imported only when a name that needs them is first used.
"""

from importlib import import_module

from .algorithms import gather_sequence, sequence_parallel_attention, shard_sequence
from .config import SeqParConfig
from .mesh import SeqParGroups, init_groups

_LAZY = {  # name -> module that defines it (imports transformers / accelerate)
    "SequenceShardingCollator": ".integrations.collator",
    "SequenceParallelPlugin": ".integrations.plugin",
    "apply_memory_savings": ".integrations.memory",
    "apply_sequence_parallel": ".integrations.transformers",
    "remove_memory_savings": ".integrations.memory",
    "remove_sequence_parallel": ".integrations.transformers",
}

__all__ = [
    "SeqParConfig",
    "SeqParGroups",
    "SequenceParallelPlugin",
    "SequenceShardingCollator",
    "apply_memory_savings",
    "apply_sequence_parallel",
    "gather_sequence",
    "init_groups",
    "remove_memory_savings",
    "remove_sequence_parallel",
    "sequence_parallel_attention",
    "shard_sequence",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hf_seqpar' has no attribute {name!r}")
