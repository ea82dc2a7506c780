"""transformers / accelerate / TRL wiring: the only layer that touches those libraries."""

from .collator import SequenceShardingCollator

__all__ = ["SequenceShardingCollator"]
