"""Single-device block attention returning (out, lse), and its backward. No torch.distributed here.

`attend_fwd` / `attend_bwd` run one query tensor against one key/value tensor whose tokens are given as runs of
global positions (segments), following a plan built once on the host per (runs, mask, batch) (plan.py): a few
variable-length flash calls on CUDA, one fused or math call per tile elsewhere; results merge in the accumulation
dtype.
"""

from . import standin
from .blocks import attend_bwd, attend_fwd, resolve_backend, varlen_impl
from .mask import BlockKind, DocumentOffsets, MaskSpec, docs_from_cu_seqlens
from .merge import acc_dtype, add_sinks, merge_into, sink_grad
from .plan import plan_cache_info

__all__ = [
    "BlockKind",
    "DocumentOffsets",
    "MaskSpec",
    "acc_dtype",
    "add_sinks",
    "attend_bwd",
    "attend_fwd",
    "docs_from_cu_seqlens",
    "merge_into",
    "plan_cache_info",
    "resolve_backend",
    "sink_grad",
    "standin",
    "varlen_impl",
]
