"""Memory beyond sequence parallelism, in plain torch: chunked cross-entropy, tiled MLPs, chunked norms, checkpoint
offload.

Each saving is exact (the plain path's math per token) and independent of sequence parallelism: it applies to this
rank's tokens, whatever their number. `hf_seqpar.integrations.memory` applies them to Hugging Face models.
"""

from .chunked_loss import ChunkedTargetLogProbs, causal_lm_loss, chunked_target_log_probs
from .offload import CheckpointOffloader
from .rowwise import ChunkedRowwise, chunked_rowwise
from .tiled import tiled_apply

__all__ = [
    "CheckpointOffloader",
    "ChunkedRowwise",
    "ChunkedTargetLogProbs",
    "causal_lm_loss",
    "chunked_rowwise",
    "chunked_target_log_probs",
    "tiled_apply",
]
