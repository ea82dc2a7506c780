"""`SequenceParallelPlugin`: sequence parallelism for a training loop that builds its own `accelerate.Accelerator`.

    plugin = SequenceParallelPlugin(SeqParConfig(sp_size=2, mode="ring"))   # or SequenceParallelPlugin(): HF_SEQPAR_*
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, loader = plugin.prepare(accelerator, model, optimizer, loader)
    for micro_batches in zip(*[iter(loader)] * 2):   # one optimizer step's micro-batches
        n = plugin.num_items_in_batch(*micro_batches)  # N: the step's targets over the world
        for batch in micro_batches:
            accelerator.backward(plugin.loss(model, batch, n))   # this rank's share of the step's mean loss
        optimizer.step(); optimizer.zero_grad()

`prepare` does for the loop what `python -m hf_seqpar` does for a Trainer: groups, attention, collator, loaders
sharded by data-parallel rank. The loss is the DESIGN.md rule `local_sum / N * world_size` with N counted over the
whole optimizer step, times the accelerator's gradient_accumulation_steps, which `accelerator.backward` divides by.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import SeqParConfig
from ..mesh import SeqParGroups, init_groups
from .accelerator import switch_for_loop
from .collator import IGNORE_INDEX
from .loaders import install_data_loader_hook
from .patches import world_size
from .tp_training import after_prepare


class SequenceParallelPlugin:
    """Switches a model and its data loaders to sequence parallelism for `accelerator.prepare`.

    `config=None` reads `HF_SEQPAR_*` (so `hf-seqpar launch` configures it too). With sp_size=1 `prepare` is plain
    `accelerator.prepare` and `loss` the model's mean loss, so one script serves both."""

    def __init__(self, config: SeqParConfig | None = None) -> None:
        self.config = SeqParConfig.from_env() if config is None else config
        self.groups: SeqParGroups | None = None
        self.accelerator = None

    def prepare(self, accelerator, *objects):
        """Switch the models and data loaders among `objects`, then return `accelerator.prepare(*objects)`.

        Collective: every rank calls it after the Accelerator exists (its process group is then initialised)."""
        self.accelerator = accelerator
        if self.config.parallel_size > 1:
            world = world_size()
            if world % self.config.parallel_size:
                raise ValueError(
                    f"hf_seqpar: sp_size * tp_size={self.config.parallel_size} must divide world_size={world}"
                )
            if self.groups is None:
                self.groups = init_groups(self.config)
            install_data_loader_hook()
        # models (memory savings at any sp_size, the startup line) and collators, as the Accelerator.prepare hook does
        switch_for_loop(objects, self.config, self.groups)
        prepared = accelerator.prepare(*objects)
        after_prepare(accelerator, prepared)  # a TP-split model: shard gradients, whole-model clip_grad_norm_
        return prepared

    def num_items_in_batch(self, *batches) -> torch.Tensor:
        """Valid targets in `batches` (one optimizer step's micro-batches), summed over every rank of the world."""
        # A causal LM predicts labels[..., 1:]; the sharded batch carries them pre-shifted as shift_labels.
        targets = [batch["shift_labels"] if "shift_labels" in batch else batch["labels"][..., 1:] for batch in batches]
        count = sum((labels != IGNORE_INDEX).sum() for labels in targets)
        if world_size() > 1:
            dist.all_reduce(count)
        return count

    def loss(self, model, batch, num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's loss `local_sum / N * world_size * gradient_accumulation_steps`, for `accelerator.backward`
        (which divides by the accumulation steps); DDP / FSDP / ZeRO then average gradients over the world into the
        gradient of the step's mean loss. N: `num_items_in_batch(*micro_batches_of_the_step)`; it may be left out
        only without gradient accumulation (the step is then this batch)."""
        steps = getattr(self.accelerator, "gradient_accumulation_steps", 1)
        if num_items_in_batch is None:
            if steps > 1:
                raise ValueError(
                    f"hf_seqpar: with gradient_accumulation_steps={steps} the loss is normalised by the targets of "
                    "the whole optimizer step; pass num_items_in_batch=plugin.num_items_in_batch(*micro_batches) "
                    "for the step's micro-batches"
                )
            num_items_in_batch = self.num_items_in_batch(batch)
        return model(**batch, num_items_in_batch=num_items_in_batch).loss * (world_size() * steps)
