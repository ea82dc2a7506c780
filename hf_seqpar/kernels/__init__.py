"""Single-device block attention returning (out, lse), and its backward. No torch.distributed here.

`attend_fwd` / `attend_bwd` run one query tensor against one key/value tensor whose tokens are given as runs of
global positions (segments), block by block, skipping what the mask hides and merging in the accumulation dtype.
"""

from .blocks import attend_bwd, attend_fwd, resolve_backend
from .mask import BlockKind, MaskSpec, docs_from_cu_seqlens
from .merge import acc_dtype, add_sinks, merge_into, sink_grad

__all__ = [
    "BlockKind",
    "MaskSpec",
    "acc_dtype",
    "add_sinks",
    "attend_bwd",
    "attend_fwd",
    "docs_from_cu_seqlens",
    "merge_into",
    "resolve_backend",
    "sink_grad",
]
