"""Switch sequence parallelism on in an unmodified Trainer / SFTTrainer script ("Strategy A", hf_integration.md §4).

hf_seqpar owns its DP x SP groups; accelerate and the Trainer see every rank as a data-parallel rank. Loss and
gradients stay exact through the stock Trainer path: the collator shards each batch, so `num_items_in_batch` (counted
on the sharded `shift_labels`, summed over the world) counts every target once; `average_tokens_across_devices=True`
makes each rank's loss `local_sum / N * world_size`; DDP / FSDP / ZeRO average gradients over the world (DESIGN.md).

Neither library has a public hook for this, so two functions are wrapped, here and nowhere else. Each wrap is
idempotent and checks the parameters it relies on when installed, so an upstream rename fails at activation:
- `transformers.Trainer.__init__`: after the stock init, build the groups, switch the model's attention, wrap the
  data collator and check the arguments. Two methods of that one Trainer instance are overridden so that eval losses
  are those of the same run without SP: `compute_loss` (sum the SP group's partial eval losses) and its
  accelerator's `gather_for_metrics` (the last, partial eval batch keeps its plain weight).
- accelerate's `prepare_data_loader` (every module that binds it): a loader whose collate_fn is (or wraps) a
  `SequenceShardingCollator` is sharded by data-parallel rank only, so all ranks of an SP group get the same batches.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys

import torch
import torch.distributed as dist

from ..config import SeqParConfig
from ..mesh import SeqParGroups, init_groups
from .collator import IGNORE_INDEX, SequenceShardingCollator
from .transformers import DOCS_KEY, apply_sequence_parallel

logger = logging.getLogger(__name__)

ORIGINAL_ATTR = "__hf_seqpar_original__"  # set on every wrapper: the function it replaced
CONFIG_ATTR = "__hf_seqpar_config__"
GROUPS_ATTR = "__hf_seqpar_groups__"
PREPARE_BINDINGS = ("accelerate.data_loader", "accelerate.accelerator", "accelerate")
PREPARE_PARAMS = ("dataloader", "num_processes", "process_index", "dispatch_batches", "torch_device_mesh")
TRAINER_INIT_PARAMS = ("model", "args", "data_collator")
COMPUTE_LOSS_PARAMS = ("model", "inputs", "return_outputs", "num_items_in_batch")
ARGS_FIELDS = ("average_tokens_across_devices", "label_smoothing_factor", "eval_use_gather_object")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_params(fn, names: tuple[str, ...], what: str) -> None:
    """Fail at install time, naming the version, if `fn` lost a parameter the hook relies on."""
    missing = [name for name in names if name not in inspect.signature(fn).parameters]
    if missing:
        raise RuntimeError(
            f"hf_seqpar cannot hook {what}: its parameters {missing} are gone in the installed version "
            f"({_versions()}); hf_seqpar supports transformers 5.x and accelerate 1.1x"
        )


def _versions() -> str:
    import accelerate
    import transformers

    return f"transformers {transformers.__version__}, accelerate {accelerate.__version__}"


def _install(owner, name: str, make_wrapper) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, once: a second call finds the wrapper and does nothing."""
    original = getattr(owner, name)
    if hasattr(original, ORIGINAL_ATTR):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, ORIGINAL_ATTR, original)
    setattr(owner, name, wrapper)


# ---- data loaders: shard by data-parallel rank only ------------------------------------------------------------


def find_seqpar_collator(collate_fn) -> SequenceShardingCollator | None:
    """The SequenceShardingCollator that `collate_fn` is, or wraps (transformers' RemoveColumnsCollator keeps the
    wrapped collator in `.data_collator`)."""
    seen = set()
    while collate_fn is not None and id(collate_fn) not in seen:
        if isinstance(collate_fn, SequenceShardingCollator):
            return collate_fn
        seen.add(id(collate_fn))
        collate_fn = getattr(collate_fn, "data_collator", None)
    return None


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
    check_params(original, PREPARE_PARAMS, "accelerate.data_loader.prepare_data_loader")
    bound_somewhere = False
    for module_name in PREPARE_BINDINGS:
        module = importlib.import_module(module_name)
        current = getattr(module, "prepare_data_loader", None)
        if current is original or getattr(current, ORIGINAL_ATTR, None) is original:
            _install(module, "prepare_data_loader", _dp_sharded)
            bound_somewhere |= module_name == "accelerate.accelerator"
    if not bound_somewhere:
        raise RuntimeError(
            f"hf_seqpar cannot hook data loaders: accelerate.accelerator no longer calls prepare_data_loader from "
            f"accelerate.data_loader ({_versions()})"
        )


# ---- Trainer: groups, attention, collator, exact eval loss -----------------------------------------------------


def _groups(config: SeqParConfig, cache: dict) -> SeqParGroups:
    """The groups of this process's current world, built once (init_groups is collective and creates groups).

    The cache also keeps the world group referenced until `release_process_groups()`, so that DDP's reducer never
    drops a group's last reference: it would destroy gloo's group with the GIL held, which deadlocks when a gloo
    worker thread is still releasing tensors of a finished collective (pytorch/pytorch#56297)."""
    world = world_size()
    if world % config.sp_size != 0:
        hint = (
            " (this process is not in a distributed launch: use hf-seqpar launch, or torchrun)" if world == 1 else ""
        )
        raise ValueError(f"sp_size={config.sp_size} must divide world_size={world}{hint}")
    if cache.get("world") is not dist.group.WORLD:
        cache.update(world=dist.group.WORLD, groups=init_groups(config))
    return cache["groups"]


def _pad_token_id(trainer) -> int:
    for owner in (trainer.processing_class, getattr(trainer.processing_class, "tokenizer", None)):
        if getattr(owner, "pad_token_id", None) is not None:
            return owner.pad_token_id
    text_config = trainer.model.config.get_text_config()
    return text_config.pad_token_id if getattr(text_config, "pad_token_id", None) is not None else 0


def _startup_line(config: SeqParConfig, groups: SeqParGroups, model, input_ids: torch.Tensor) -> str:
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


def _exact_compute_loss(trainer, config: SeqParConfig, groups: SeqParGroups):
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
                print(_startup_line(config, groups, trainer.model, inputs["input_ids"]), flush=True)
        if model.training:
            return compute_loss(model, inputs, *args, **kwargs)
        n_local = (inputs["shift_labels"] != IGNORE_INDEX).sum()
        result = compute_loss(model, inputs, *args, **kwargs)
        num_items = signature.bind(model, inputs, *args, **kwargs).arguments.get("num_items_in_batch")
        loss = result[0] if isinstance(result, tuple) else result
        loss = sp_group_eval_loss(loss, n_local, num_items is not None, groups)
        return (loss, *result[1:]) if isinstance(result, tuple) else loss

    return compute_loss_sp


def _sp_aware_gather_for_metrics(accelerator):
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


def attach(trainer, config: SeqParConfig, groups_cache: dict) -> None:
    """Switch one freshly built Trainer to sequence parallelism (called at the end of `Trainer.__init__`)."""
    args = trainer.args
    if args.label_smoothing_factor:
        raise ValueError(
            f"label_smoothing_factor={args.label_smoothing_factor} re-shifts the labels of each sequence shard, which "
            "is not exact under sequence parallelism; set it to 0"
        )
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        raise ValueError(
            "train_sampling_strategy='batch_rebalance' deals batches by global rank, so the ranks of a sequence-"
            "parallel group would get different samples; use 'random' or 'group_by_length'"
        )
    if not trainer.model_accepts_loss_kwargs and trainer.compute_loss_func is None:
        raise ValueError(
            f"{type(trainer.model).__name__}.forward takes no **kwargs, so the Trainer cannot pass num_items_in_batch "
            "and every rank would average its own shard; sequence parallelism needs a model that accepts loss kwargs"
        )
    if not args.average_tokens_across_devices:
        logger.warning("hf_seqpar: setting average_tokens_across_devices=True (exact loss needs the world's count)")
        args.average_tokens_across_devices = True
    if trainer.compute_metrics is not None:
        logger.warning("hf_seqpar: compute_metrics sees this rank's sequence shards of logits and labels")
    groups = _groups(config, groups_cache)
    apply_sequence_parallel(trainer.model, config=config, groups=groups)
    if not isinstance(trainer.data_collator, SequenceShardingCollator):
        trainer.data_collator = SequenceShardingCollator(
            trainer.data_collator, config=config, groups=groups, pad_token_id=_pad_token_id(trainer)
        )
    trainer.compute_loss = _exact_compute_loss(trainer, config, groups)
    # evaluation_loop gathers eval losses with `trainer.gather_function` and later resets it from the accelerator.
    trainer.accelerator.gather_for_metrics = _sp_aware_gather_for_metrics(trainer.accelerator)
    trainer.gather_function = functools.partial(
        trainer.accelerator.gather_for_metrics, use_gather_object=args.eval_use_gather_object
    )


def _attaching_init(config: SeqParConfig):
    groups_cache: dict = {}

    def make_wrapper(init):
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            attach(self, config, groups_cache)

        setattr(__init__, CONFIG_ATTR, config)
        setattr(__init__, GROUPS_ATTR, groups_cache)
        return __init__

    return make_wrapper


def release_process_groups() -> None:
    """Drop the process groups the Trainer hook keeps (see `_groups`). Call after `destroy_process_group()` and
    after the models are gone, while the interpreter is fully alive; `python -m hf_seqpar` does."""
    trainer_module = sys.modules.get("transformers.trainer")
    init = getattr(getattr(trainer_module, "Trainer", None), "__init__", None)
    getattr(init, GROUPS_ATTR, {}).clear()


def install_trainer_hook(config: SeqParConfig) -> None:
    """Wrap `transformers.Trainer.__init__` so every Trainer (SFTTrainer too) is switched after its stock init."""
    from accelerate import Accelerator
    from accelerate.state import GradientState
    from transformers import Trainer, TrainingArguments

    check_params(Trainer.__init__, TRAINER_INIT_PARAMS, "transformers.Trainer.__init__")
    check_params(Trainer.compute_loss, COMPUTE_LOSS_PARAMS, "transformers.Trainer.compute_loss")
    missing = [name for name in ARGS_FIELDS if name not in TrainingArguments.__dataclass_fields__]
    missing += [name for name in ("active_dataloader", "remainder") if not hasattr(GradientState, name)]
    if missing:
        raise RuntimeError(
            f"hf_seqpar needs TrainingArguments / Accelerator attributes {missing}, gone in {_versions()}"
        )
    check_params(Accelerator.gather_for_metrics, ("input_data", "use_gather_object"), "Accelerator.gather_for_metrics")
    active = getattr(Trainer.__init__, CONFIG_ATTR, None)
    if active is not None and active != config:
        raise ValueError(f"hf_seqpar is already active with {active}; cannot switch to {config} in one process")
    _install(Trainer, "__init__", _attaching_init(config))


def activate(config: SeqParConfig) -> None:
    """Switch sequence parallelism on for every Trainer this process builds from now on. Idempotent.

    Call it before the script's own code runs (`python -m hf_seqpar script.py` does). sp_size=1 changes nothing."""
    if config.sp_size == 1:
        return
    install_data_loader_hook()
    install_trainer_hook(config)
