"""Sequence parallelism for an unmodified accelerate training loop (`Accelerator.prepare`, `model(**batch).loss`,
`accelerator.backward`, `accelerator.accumulate`, `clip_grad_norm_`: transformers' run_clm_no_trainer.py pattern).

Under `python -m hf_seqpar` (so `hf-seqpar launch`), `Accelerator.prepare` is wrapped: before the stock prepare runs,
each model is switched (`apply_sequence_parallel`, memory savings included) and each data loader's collate_fn is
wrapped in `SequenceShardingCollator` (loaders.py then shards the loader by data-parallel rank). Accelerators that a
Trainer owns are left alone: the Trainer hook has switched their model and loaders already. `SequenceParallelPlugin`
switches its objects with the same `switch_for_loop`.

The loss of a forward the script calls without `num_items_in_batch` (the plain `model(**batch).loss`): the plain run
backpropagates, per micro-batch and rank, the mean over that rank's targets, `S_g / N_g`, and DDP averages over its
dp ranks. Here the dp*sp ranks all reduce, so each SP rank of group g backpropagates `local_sum / N_g * sp_size`
(`N_g`: the valid targets of the group's rows in this micro-batch, all-reduced over the SP group): averaged over the
world that is the plain gradient, whatever accelerate then divides by for gradient accumulation, and whatever
`clip_grad_norm_` sees. The VALUE returned is the group's mean `S_g / N_g`, the plain run's
(`loss_for_grad + (group_mean - loss_for_grad).detach()`), so what the script logs or gathers is the plain number.
A forward given `num_items_in_batch` keeps API.md's meaning (`local_sum / N`) untouched.

What cannot be made exact is refused at first use: a training forward of a batch that did not come from a prepared
loader, a sharded forward without labels (a loss computed from `outputs.logits`, which hold one shard of each row),
and a router auxiliary loss (MoE `output_router_logits=True`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..config import SeqParConfig
from ..mesh import SeqParGroups, init_groups
from .collator import IGNORE_INDEX, SequenceShardingCollator
from .evaluation import dp_gather_for_metrics, startup_line
from .loaders import find_seqpar_collator, install_data_loader_hook
from .memory import apply_memory_savings
from .patches import install, installed, patch_instance, trainer_owned, uninstall, world_size
from .tp_training import after_prepare
from .transformers import DOCS_KEY, STATE_ATTR, apply_sequence_parallel

LOOP_ATTR = "_hf_seqpar_loop"  # on a model switched for a training loop: its LoopState
GROUPS_ATTR = "__hf_seqpar_groups__"  # on the prepare wrapper: its groups cache (released at exit)


def groups_for(config: SeqParConfig, cache: dict) -> SeqParGroups:
    """The groups of this process's current world, built once (init_groups is collective and creates groups).

    The cache also keeps the world group referenced until `release_process_groups()`, so that DDP's reducer never
    drops a group's last reference: it would destroy gloo's group with the GIL held, which deadlocks when a gloo
    worker thread is still releasing tensors of a finished collective (pytorch/pytorch#56297)."""
    world = world_size()
    if world % config.parallel_size != 0:
        hint = (
            " (this process is not in a distributed launch: use hf-seqpar launch, or torchrun)" if world == 1 else ""
        )
        what = f"sp_size={config.sp_size}" + (f" x tp_size={config.tp_size}" if config.tp_size > 1 else "")
        raise ValueError(f"hf_seqpar: {what} must divide world_size={world}{hint}")
    if cache.get("world") is not dist.group.WORLD:
        cache.update(world=dist.group.WORLD, groups=init_groups(config))
    return cache["groups"]


@dataclasses.dataclass
class LoopState:
    """What the loop hooks of one model need: its resolved config and groups, and whether the startup line ran."""

    config: SeqParConfig
    groups: SeqParGroups
    hooks: list = dataclasses.field(default_factory=list)
    announced: bool = False
    rescale: bool = False  # set by the pre-hook for the forward in progress (the module is never called recursively)


def _refuse_unsharded(model: torch.nn.Module) -> None:
    raise RuntimeError(
        f"hf_seqpar: {type(model).__name__} is sequence parallel, but this training forward got no "
        f"'{DOCS_KEY}': its batch did not come from a data loader passed to accelerator.prepare, or only part of "
        "the batch was passed. Every rank would compute its own rows as whole sequences; prepare the loader and call "
        "model(**batch) with the whole batch"
    )


def _pre_hook(state: LoopState):
    def before_forward(model, args, kwargs):
        state.rescale = False
        if kwargs.get(DOCS_KEY) is None:
            if model.training and torch.is_grad_enabled():
                _refuse_unsharded(model)
            return None  # generate, a plain prompt: the original attention on whole rows
        if kwargs.get("shift_labels") is None and kwargs.get("labels") is None:
            raise RuntimeError(
                f"hf_seqpar: a sequence-parallel forward of {type(model).__name__} without labels: its logits hold "
                f"only this rank's 1/{state.groups.rows[2]} of each sequence (in layout order), so a loss or metric "
                "computed from outputs.logits would not be the plain run's. Pass the batch's labels and use "
                "outputs.loss (hf_seqpar makes it exact), or run without sequence parallelism"
            )
        if not state.announced:
            state.announced = True
            if dist.get_rank() == 0:
                print(startup_line(state.config, state.groups, kwargs["input_ids"]), flush=True)
        if kwargs.get("num_items_in_batch") is not None:
            return None  # the script's own normalisation: local_sum / N, as API.md says
        targets = kwargs.get("shift_labels")
        targets = kwargs["labels"][..., 1:] if targets is None else targets
        count = (targets != IGNORE_INDEX).sum().reshape(1)
        dist.all_reduce(count, group=state.groups.rows[0])  # tp_size > 1: each TP rank holds its piece's labels
        state.rescale = True
        # A group without any target: 0 (the plain mean would be NaN), never a division by zero.
        return args, {**kwargs, "num_items_in_batch": count.clamp(min=1)[0]}

    return before_forward


def _post_hook(state: LoopState):
    def after_forward(model, args, output):
        if not state.rescale:
            return None
        state.rescale = False
        loss = output["loss"] if isinstance(output, dict) else output[0]
        if getattr(output, "aux_loss", None) is not None:
            raise NotImplementedError(
                f"hf_seqpar: {type(model).__name__} adds a router auxiliary loss (output_router_logits=True) to "
                "outputs.loss, whose share per rank the unmodified-loop path does not rescale; set "
                "output_router_logits=False, or train it with the Trainer"
            )
        rows_group, _, rows_size = state.groups.rows
        for_grad = loss * rows_size  # DDP averages over dp * sp * tp ranks; the plain run over dp
        group_mean = loss.detach().clone()
        dist.all_reduce(group_mean, group=rows_group)  # sum of local_sum / N_g: the group's mean
        loss = for_grad + (group_mean - for_grad).detach()
        if isinstance(output, dict):
            output["loss"] = loss
            return output
        return (loss, *output[1:])

    return after_forward


def install_loop_hooks(model: torch.nn.Module, config: SeqParConfig, groups: SeqParGroups) -> LoopState:
    """Hooks on the module the script calls (a PeftModel too), see the module docstring. Replaces earlier ones."""
    previous = model.__dict__.get(LOOP_ATTR)
    for handle in previous.hooks if previous is not None else ():
        handle.remove()
    state = LoopState(config=config, groups=groups)
    state.hooks = [
        model.register_forward_pre_hook(_pre_hook(state), with_kwargs=True),
        model.register_forward_hook(_post_hook(state)),
    ]
    model.__dict__[LOOP_ATTR] = state
    return state


def _base(model: torch.nn.Module) -> torch.nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def switch_for_loop(objects: tuple, config: SeqParConfig, groups: SeqParGroups | None) -> tuple:
    """Switch the models and data loaders among `objects` for a training loop (in place; returns `objects`).

    sp_size=1: the memory savings only. Otherwise models not switched yet get `apply_sequence_parallel` and the loop
    hooks; loaders whose collate_fn is no SequenceShardingCollator yet get one (with the first model's resolved
    config, so that mode='auto' picks the same split for data and attention)."""
    models = [obj for obj in objects if isinstance(obj, torch.nn.Module)]
    if config.parallel_size == 1:
        for model in models:
            apply_memory_savings(model, config)
        return objects
    resolved = None
    for model in models:
        if model.__dict__.get(LOOP_ATTR) is not None or STATE_ATTR in _base(model).__dict__:
            resolved = resolved or getattr(_base(model), STATE_ATTR).config  # switched already (by the script)
            continue
        apply_sequence_parallel(model, config=config, groups=groups)
        resolved = resolved or getattr(_base(model), STATE_ATTR).config
        install_loop_hooks(model, resolved, groups)
    for loader in [obj for obj in objects if isinstance(obj, torch.utils.data.DataLoader)]:
        if find_seqpar_collator(loader.collate_fn) is not None:
            continue
        if resolved is None and config.mode == "auto":
            raise ValueError(
                "hf_seqpar: mode='auto' picks the split from the model's attention heads, and this prepare() call "
                "has a data loader but no model; prepare the model first (or together), or set mode explicitly"
            )
        # DataLoader allows setting collate_fn after construction; loaders.py's hook sees it at prepare.
        loader.collate_fn = SequenceShardingCollator(loader.collate_fn, config=resolved or config, groups=groups)
    return objects


def _switching_prepare(config: SeqParConfig, cache: dict):
    def make_wrapper(prepare):
        def prepare_sp(self, *args, **kwargs):
            if not trainer_owned(self):
                groups = None
                if config.parallel_size > 1:
                    groups = groups_for(config, cache)
                    if "gather_for_metrics" not in self.__dict__:  # eval values: each SP group's rows once
                        gather = dp_gather_for_metrics(self, groups)
                        patch_instance(self, {"Accelerator.gather_for_metrics": [lambda _: gather]})
                switch_for_loop(args, config, groups)
            prepared = prepare(self, *args, **kwargs)
            after_prepare(self, prepared)  # TP-split models (a Trainer's too): shard gradients, whole-model norm
            return prepared

        setattr(prepare_sp, GROUPS_ATTR, cache)
        return prepare_sp

    return make_wrapper


def install_accelerator_hook(config: SeqParConfig) -> None:
    """Wrap `accelerate.Accelerator.prepare` so that every accelerator not owned by a Trainer switches what it
    prepares (see the module docstring). Another config replaces the wrap."""
    if config.parallel_size > 1:
        install_data_loader_hook()
    install("Accelerator.prepare", _switching_prepare(config, {}), key=("accelerator", config))


def uninstall_accelerator_hook() -> None:
    uninstall("Accelerator.prepare")


def release_process_groups() -> None:
    """Drop the groups the prepare hook keeps (see `groups_for`), after `destroy_process_group()`."""
    import sys

    if "accelerate.accelerator" in sys.modules:
        getattr(installed("Accelerator.prepare"), GROUPS_ATTR, {}).clear()
