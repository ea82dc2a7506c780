"""Switch every Trainer (SFTTrainer too) to sequence parallelism after its stock `__init__` ("Strategy A",
hf_integration.md §4).

hf_seqpar owns its DP x SP groups; accelerate and the Trainer see every rank as a data-parallel rank. Loss and
gradients stay exact through the stock Trainer path: the collator shards each batch, so `num_items_in_batch` (counted
on the sharded `shift_labels`, summed over the world) counts every target once; `average_tokens_across_devices=True`
makes each rank's loss `local_sum / N * world_size`; DDP / FSDP / ZeRO average gradients over the world (DESIGN.md).
"""

from __future__ import annotations

import logging
import sys

import torch.distributed as dist

from ..config import SeqParConfig
from ..mesh import SeqParGroups, init_groups
from .accelerator import mark_trainer_accelerator
from .collator import SequenceShardingCollator
from .evaluation import EvalState, exact_compute_loss, exact_evaluation_loop, exact_prediction_step
from .hooks import check_params, install, versions, world_size
from .logs import honest_logs
from .memory import apply_memory_savings
from .transformers import apply_sequence_parallel
from .trl import adapt_trl_trainer

logger = logging.getLogger(__name__)

CONFIG_ATTR = "__hf_seqpar_config__"
GROUPS_ATTR = "__hf_seqpar_groups__"
TRAINER_INIT_PARAMS = ("model", "args", "data_collator")
COMPUTE_LOSS_PARAMS = ("model", "inputs", "return_outputs", "num_items_in_batch")
# The Trainer methods attach() wraps per instance (evaluation.py, logs.py), with the parameters the wraps rely on.
TRAINER_METHODS = {
    "prediction_step": ("model", "inputs", "prediction_loss_only", "ignore_keys"),
    "evaluation_loop": ("dataloader",),
    "predict": ("test_dataset",),
    "log": ("logs",),
    "call_model_init": (),
    "get_total_train_batch_size": ("args",),
    "floating_point_ops": ("inputs",),
    "_track_num_input_tokens": ("inputs",),
}
ARGS_FIELDS = (
    "average_tokens_across_devices",
    "label_smoothing_factor",
    "eval_use_gather_object",
    "include_for_metrics",
    "include_num_input_tokens_seen",
)


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
        raise ValueError(f"hf_seqpar: sp_size={config.sp_size} must divide world_size={world}{hint}")
    if cache.get("world") is not dist.group.WORLD:
        cache.update(world=dist.group.WORLD, groups=init_groups(config))
    return cache["groups"]


def _pad_token_id(trainer) -> int:
    for owner in (trainer.processing_class, getattr(trainer.processing_class, "tokenizer", None)):
        if getattr(owner, "pad_token_id", None) is not None:
            return owner.pad_token_id
    text_config = trainer.model.config.get_text_config()
    return text_config.pad_token_id if getattr(text_config, "pad_token_id", None) is not None else 0


def _resolved_for(model, config: SeqParConfig) -> SeqParConfig:
    text_config = model.config.get_text_config()
    heads = text_config.num_attention_heads
    return config.resolve(heads, getattr(text_config, "num_key_value_heads", None) or heads)


def _switch_model_init(trainer, config: SeqParConfig, groups: SeqParGroups) -> None:
    """`train()` re-creates the model with `model_init` (a hyperparameter search, once per trial): switch each."""
    call_model_init = trainer.call_model_init

    def call_model_init_sp(*args, **kwargs):
        return apply_sequence_parallel(call_model_init(*args, **kwargs), config=config, groups=groups)

    trainer.call_model_init = call_model_init_sp


def _refuse_what_cannot_be_exact(trainer) -> None:
    args = trainer.args
    if args.label_smoothing_factor:
        raise ValueError(
            f"hf_seqpar: label_smoothing_factor={args.label_smoothing_factor} re-shifts the labels of each sequence "
            "shard, which is not exact under sequence parallelism; set it to 0"
        )
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        raise ValueError(
            "hf_seqpar: train_sampling_strategy='batch_rebalance' deals batches by global rank, so the ranks of a "
            "sequence-parallel group would get different samples; use 'random' or 'group_by_length'"
        )
    if trainer.compute_loss_func is not None:
        raise ValueError(
            "hf_seqpar: a custom compute_loss_func would receive this rank's sequence shard of the logits, with "
            "labels already shifted on the whole row, and cannot be made exact without knowing what it computes; "
            "remove it and let the model compute the loss (it gets shift_labels and num_items_in_batch), or subclass "
            "the Trainer and override compute_loss using inputs['shift_labels']"
        )
    if not trainer.model_accepts_loss_kwargs:
        raise ValueError(
            f"hf_seqpar: {type(trainer.model).__name__}.forward takes no **kwargs, so the Trainer cannot pass "
            "num_items_in_batch and every rank would average its own shard; sequence parallelism needs a model that "
            "accepts loss kwargs"
        )


def attach(trainer, config: SeqParConfig, groups_cache: dict) -> None:
    """Switch one freshly built Trainer to sequence parallelism (called at the end of `Trainer.__init__`)."""
    mark_trainer_accelerator(trainer.accelerator)  # its prepare() calls see models and loaders switched here
    apply_memory_savings(trainer.model, config)  # chunked loss, tiled MLP, offload: what the config asks for, any path
    if adapt_trl_trainer(trainer, config, _groups(config, groups_cache)):  # DPO / KTO: whole-sequence path
        return
    _refuse_what_cannot_be_exact(trainer)
    args = trainer.args
    if not args.average_tokens_across_devices:
        logger.warning("hf_seqpar: setting average_tokens_across_devices=True (exact loss needs the world's count)")
        args.average_tokens_across_devices = True
    groups = _groups(config, groups_cache)
    config = _resolved_for(trainer.model, config)  # once: the model, collator, metrics and logs share it
    apply_sequence_parallel(trainer.model, config=config, groups=groups)
    _switch_model_init(trainer, config, groups)
    if isinstance(trainer.data_collator, SequenceShardingCollator):
        trainer.data_collator.keep_unsharded = True
    else:
        trainer.data_collator = SequenceShardingCollator(
            trainer.data_collator,
            config=config,
            groups=groups,
            pad_token_id=_pad_token_id(trainer),
            keep_unsharded=True,  # the record of the plain batch that eval metrics and token counts need
        )
    state = EvalState(config=config, groups=groups)
    trainer.compute_loss = exact_compute_loss(trainer, state)
    trainer.prediction_step = exact_prediction_step(trainer, state)
    trainer.evaluation_loop = exact_evaluation_loop(trainer, state)
    honest_logs(trainer, state)


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
    missing += [name for name in ("end_of_dataloader", "remainder") if not hasattr(GradientState, name)]
    missing += [name for name in TRAINER_METHODS if not hasattr(Trainer, name)]
    if missing:
        raise RuntimeError(
            f"hf_seqpar needs TrainingArguments / Accelerator / Trainer attributes {missing}, gone in {versions()}"
        )
    check_params(Accelerator.gather_for_metrics, ("input_data", "use_gather_object"), "Accelerator.gather_for_metrics")
    for name, params in TRAINER_METHODS.items():
        check_params(getattr(Trainer, name), params, f"transformers.Trainer.{name}")
    # A second activation with another config replaces this hook (or the sp_size=1 memory hook): the new one wins
    # for every Trainer built from then on.
    install(Trainer, "__init__", _attaching_init(config), key=("trainer", config))
