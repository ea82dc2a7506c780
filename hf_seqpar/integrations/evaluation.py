"""Eval losses equal to those of the same run without SP (Trainer.compute_loss and gather_for_metrics, per Trainer)."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from ..config import SeqParConfig
from ..mesh import SeqParGroups
from .collator import IGNORE_INDEX
from .hooks import world_size
from .loaders import find_seqpar_collator
from .transformers import DOCS_KEY


def startup_line(config: SeqParConfig, groups: SeqParGroups, model, input_ids: torch.Tensor) -> str:
    text_config = model.config.get_text_config()
    heads = text_config.num_attention_heads
    resolved = config.resolve(heads, getattr(text_config, "num_key_value_heads", None) or heads)
    ulysses, ring = resolved.split
    batch, seq_local = input_ids.shape
    return (
        f"hf_seqpar: world {world_size()} = DP {groups.dp_size} x SP {groups.sp_size} (ulysses {ulysses} x ring "
        f"{ring}), mode {resolved.mode}, layout {resolved.resolved_layout}, {batch * seq_local} tokens per rank "
        f"({batch} x {seq_local} of {seq_local * groups.sp_size})"
    )


def sp_group_eval_loss(
    loss: torch.Tensor, n_local: torch.Tensor, normalized_by_world: bool, groups: SeqParGroups
) -> torch.Tensor:
    """This rank's eval loss made equal to what the same run without SP reports on this data-parallel rank.

    `normalized_by_world`: the loss is `local_sum / N * world_size` (Trainer.prediction_step passes the world's
    token count N); without SP the rank holding the whole rows reports `sum_sp(local_sum) / N * dp_size`. Otherwise
    the loss is this shard's token mean (TRL's prediction_step passes no count), and the whole rows' mean is the
    token-weighted mean over the SP group."""
    loss = loss.detach()
    if normalized_by_world:
        total = loss.clone()
        dist.all_reduce(total, group=groups.sp_group)
        return total / groups.sp_size
    n_local = n_local.to(device=loss.device, dtype=loss.dtype)
    sums = torch.stack([torch.where(n_local > 0, loss * n_local, torch.zeros_like(loss)), n_local])
    dist.all_reduce(sums, group=groups.sp_group)
    return sums[0] / sums[1].clamp(min=1)


def exact_compute_loss(trainer, config: SeqParConfig, groups: SeqParGroups):
    compute_loss = trainer.compute_loss  # bound: a subclass's override (SFTTrainer) included
    signature = inspect.signature(compute_loss)
    announced = []

    def compute_loss_sp(model, inputs, *args, **kwargs):
        if DOCS_KEY not in inputs:
            raise RuntimeError(
                f"this batch was not sharded by hf_seqpar (no '{DOCS_KEY}'): the Trainer's data_collator was replaced "
                "after Trainer.__init__, or a custom get_*_dataloader bypasses it"
            )
        if not announced:
            announced.append(True)
            if dist.get_rank() == 0:
                print(startup_line(config, groups, trainer.model, inputs["input_ids"]), flush=True)
        if model.training:
            return compute_loss(model, inputs, *args, **kwargs)
        n_local = (inputs["shift_labels"] != IGNORE_INDEX).sum()
        result = compute_loss(model, inputs, *args, **kwargs)
        num_items = signature.bind(model, inputs, *args, **kwargs).arguments.get("num_items_in_batch")
        loss = result[0] if isinstance(result, tuple) else result
        loss = sp_group_eval_loss(loss, n_local, num_items is not None, groups)
        return (loss, *result[1:]) if isinstance(result, tuple) else loss

    return compute_loss_sp


def sp_aware_gather_for_metrics(accelerator):
    gather_for_metrics = accelerator.gather_for_metrics  # bound method of this Accelerator

    def gather_for_metrics_sp(input_data, use_gather_object=False):
        loader = accelerator.gradient_state.active_dataloader
        collator = find_seqpar_collator(getattr(loader, "collate_fn", None))
        if collator is None or getattr(loader, "remainder", -1) <= 0:
            return gather_for_metrics(input_data, use_gather_object=use_gather_object)
        # At the last, partial batch accelerate keeps the first `remainder` gathered entries. Gathered over the world,
        # each data-parallel rank's entries appear sp_size times in a row (its SP ranks report the same eval loss),
        # so the real samples are the first remainder * sp_size entries: every batch then keeps its plain weight.
        remainder = loader.remainder
        loader.remainder = remainder * collator.groups.sp_size
        try:
            return gather_for_metrics(input_data, use_gather_object=use_gather_object)
        finally:
            loader.remainder = remainder

    return gather_for_metrics_sp
