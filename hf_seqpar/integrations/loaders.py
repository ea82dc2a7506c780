"""Data loaders sharded by data-parallel rank only: every rank of an SP group gets the same batches.

accelerate's `prepare_data_loader` (every module that binds it) is wrapped: a loader whose collate_fn is (or wraps)
a `SequenceShardingCollator` is cut into dp_size shards instead of world_size.
"""

from __future__ import annotations

import importlib
import inspect

from .collator import SequenceShardingCollator, collator_chain
from .patches import ORIGINAL_ATTR, PATCHES, install, versions

ROW = "prepare_data_loader"  # PATCHES: accelerate.data_loader's function, and the modules that import it


def find_seqpar_collator(collate_fn) -> SequenceShardingCollator | None:
    """The SequenceShardingCollator that `collate_fn` is, or wraps."""
    return next((c for c in collator_chain(collate_fn) if isinstance(c, SequenceShardingCollator)), None)


def _dp_sharded(prepare_data_loader):
    signature = inspect.signature(prepare_data_loader)

    def prepare_data_loader_by_dp_rank(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        collator = find_seqpar_collator(getattr(bound.arguments["dataloader"], "collate_fn", None))
        if collator is not None:
            # accelerate would shard by global rank (and dispatch mode slices by it too). Every rank of an SP group
            # must see the same samples, so the loader is cut into dp_size shards; no mesh, so nothing overrides it.
            groups = collator.groups
            bound.arguments.update(
                num_processes=groups.dp_size,
                process_index=groups.dp_rank,
                dispatch_batches=False,
                torch_device_mesh=None,
            )
        return prepare_data_loader(*bound.args, **bound.kwargs)

    return prepare_data_loader_by_dp_rank


def install_data_loader_hook() -> None:
    """Wrap accelerate's `prepare_data_loader` in every module that binds it (idempotent)."""
    from accelerate import data_loader

    original = getattr(data_loader.prepare_data_loader, ORIGINAL_ATTR, data_loader.prepare_data_loader)
    bound_somewhere = False
    for module_name in (PATCHES[ROW].owner, *PATCHES[ROW].owners):
        module = importlib.import_module(module_name)
        current = getattr(module, "prepare_data_loader", None)
        if current is original or getattr(current, ORIGINAL_ATTR, None) is original:
            install(ROW, _dp_sharded, owner=module)
            bound_somewhere |= module_name == "accelerate.accelerator"
    if not bound_somewhere:
        raise RuntimeError(
            f"hf_seqpar: cannot hook data loaders: accelerate.accelerator no longer calls prepare_data_loader from "
            f"accelerate.data_loader ({versions()})"
        )
