"""Switch every Trainer (SFTTrainer too) to sequence parallelism after its stock `__init__` ("Strategy A",
hf_integration.md §4).

hf_seqpar owns its DP x SP groups; accelerate and the Trainer see every rank as a data-parallel rank. Loss and
gradients stay exact through the stock Trainer path: the collator shards each batch, so `num_items_in_batch` (counted
on the sharded `shift_labels`, summed over the world) counts every target once; `average_tokens_across_devices=True`
makes each rank's loss `local_sum / N * world_size`; DDP / FSDP / ZeRO average gradients over the world (DESIGN.md).
"""

from __future__ import annotations

import functools
import logging
import sys

from ..config import SeqParConfig
from ..mesh import SeqParGroups
from .accelerator import groups_for
from .collator import SequenceShardingCollator
from .evaluation import EvalState, exact_compute_loss, exact_evaluation_loop, exact_prediction_step
from .logs import log_chains, trl_num_tokens, whole_rows_log_chains
from .memory import apply_memory_savings
from .patches import (
    PATCHES,
    check_rows,
    install,
    installed,
    mark_trainer_accelerator,
    patch_instance,
    set_attr,
    versions,
)
from .tp_training import move_split_model, split_models_only, trainer_chains
from .transformers import STATE_ATTR, apply_sequence_parallel
from .trl import WHOLE_SEQUENCES, check_trl_trainer, check_whole_sequence_trainer, whole_sequence_chains

logger = logging.getLogger(__name__)

CONFIG_ATTR = "__hf_seqpar_config__"
GROUPS_ATTR = "__hf_seqpar_groups__"
# The Trainer methods attach() rebinds per instance: their rows in PATCHES (parameters checked at activation).
TRAINER_METHODS = [
    row for row in PATCHES.values() if row.kind == "instance" and row.owner == "transformers.trainer:Trainer"
]
ARGS_FIELDS = (
    "average_tokens_across_devices",
    "label_smoothing_factor",
    "eval_use_gather_object",
    "include_for_metrics",
    "include_num_input_tokens_seen",
)


def _pad_token_id(trainer) -> int:
    for owner in (trainer.processing_class, getattr(trainer.processing_class, "tokenizer", None)):
        if getattr(owner, "pad_token_id", None) is not None:
            return owner.pad_token_id
    text_config = trainer.model.config.get_text_config()
    return text_config.pad_token_id if getattr(text_config, "pad_token_id", None) is not None else 0


def _switch_model_init(config: SeqParConfig, groups: SeqParGroups, call_model_init):
    """`train()` re-creates the model with `model_init` (a hyperparameter search, once per trial): switch each."""

    def call_model_init_sp(*args, **kwargs):
        return apply_sequence_parallel(call_model_init(*args, **kwargs), config=config, groups=groups)

    return call_model_init_sp


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


def _base(model):
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def attach(trainer, config: SeqParConfig, groups_cache: dict) -> None:
    """Switch one freshly built Trainer to sequence parallelism (called at the end of `Trainer.__init__`; with
    sp_size=1, only to the memory savings the config asks for)."""
    # DPO / KTO take the whole-sequence path; the TRL trainers that cannot be exact are refused (by class) first
    whole_sequences = config.parallel_size > 1 and check_trl_trainer(trainer) == WHOLE_SEQUENCES
    if whole_sequences and config.tp_size > 1:
        raise NotImplementedError(
            f"hf_seqpar: {type(trainer).__name__} runs whole sequences on every rank, which tensor parallelism's "
            "per-rank token pieces do not support; use tp_size=1 (sequence parallelism alone supports it)"
        )
    mark_trainer_accelerator(trainer.accelerator)  # its prepare() calls see models and loaders switched here
    apply_memory_savings(trainer.model, config)  # chunked loss, tiled MLP, offload: what the config asks for, any path
    if config.parallel_size == 1:
        return
    groups = groups_for(config, groups_cache)
    if whole_sequences:
        check_whole_sequence_trainer(trainer)
    else:
        _refuse_what_cannot_be_exact(trainer)
        if not trainer.args.average_tokens_across_devices:
            logger.warning(
                "hf_seqpar: setting average_tokens_across_devices=True (exact loss needs the world's count)"
            )
            set_attr(trainer.args, "TrainingArguments.average_tokens_across_devices", True)
    apply_sequence_parallel(trainer.model, config=config, groups=groups)
    # resolved once, by apply: the model, collator, metrics and logs share it
    config = getattr(_base(trainer.model), STATE_ATTR).config
    if whole_sequences:
        patch_instance(
            trainer, {**whole_sequence_chains(trainer, config, groups), **whole_rows_log_chains(trainer, groups)}
        )
        return
    collator = trainer.data_collator
    if isinstance(collator, SequenceShardingCollator):
        collator.keep_unsharded = True
    else:
        collator = SequenceShardingCollator(
            trainer.data_collator,
            config=config,
            groups=groups,
            pad_token_id=_pad_token_id(trainer),
            keep_unsharded=True,  # the record of the plain batch that eval metrics and token counts need
        )
        set_attr(trainer, "Trainer.data_collator", collator)
    state = EvalState(config=config, groups=groups)
    chains = {
        # the exact loss first; TRL's SFTTrainer token count then reads the plain batch's record around it
        "Trainer.compute_loss": [
            functools.partial(exact_compute_loss, trainer, state),
            functools.partial(trl_num_tokens, trainer, state),
        ],
        "Trainer.prediction_step": [functools.partial(exact_prediction_step, trainer, state)],
        "Trainer.evaluation_loop": [functools.partial(exact_evaluation_loop, trainer, state)],
        "Trainer.call_model_init": [functools.partial(_switch_model_init, config, groups)],
        **log_chains(trainer, state),
        **trainer_chains(trainer),  # tp_size > 1: whole checkpoints, per-TP-rank optimizer state
    }
    patch_instance(trainer, chains)


def _attaching_init(config: SeqParConfig):
    groups_cache: dict = {}

    def make_wrapper(init):
        def __init__(self, *args, **kwargs):
            if config.tp_size > 1:  # the whole model must not reach the GPU before it is split (a 70B would not fit)
                patch_instance(self, {"Trainer._move_model_to_device": [split_models_only]})
            init(self, *args, **kwargs)
            attach(self, config, groups_cache)
            if config.tp_size > 1:
                move_split_model(self)

        setattr(__init__, CONFIG_ATTR, config)
        setattr(__init__, GROUPS_ATTR, groups_cache)
        return __init__

    return make_wrapper


def release_process_groups() -> None:
    """Drop the process groups the Trainer hook keeps (see `accelerator.groups_for`). Call after
    `destroy_process_group()` and after the models are gone, while the interpreter is fully alive; `python -m
    hf_seqpar` does."""
    if "transformers.trainer" in sys.modules:
        getattr(installed("Trainer.__init__"), GROUPS_ATTR, {}).clear()


def install_trainer_hook(config: SeqParConfig) -> None:
    """Wrap `transformers.Trainer.__init__` so every Trainer (SFTTrainer too) is switched after its stock init (with
    sp_size=1: gets the memory savings of `config`)."""
    from accelerate.state import GradientState
    from transformers import Trainer, TrainingArguments

    missing = [name for name in ARGS_FIELDS if name not in TrainingArguments.__dataclass_fields__]
    missing += [name for name in ("end_of_dataloader", "remainder") if not hasattr(GradientState, name)]
    missing += [row.attr for row in TRAINER_METHODS if not hasattr(Trainer, row.attr)]
    if missing:
        raise RuntimeError(
            f"hf_seqpar needs TrainingArguments / Accelerator / Trainer attributes {missing}, gone in {versions()}"
        )
    check_rows("transformers.trainer:")  # every Trainer method attach() rebinds, with the parameters it relies on
    check_rows("accelerate.")
    # A second activation with another config replaces this hook (the sp_size=1 one too): the new one wins for every
    # Trainer built from then on.
    kind = "memory" if config.parallel_size == 1 else "trainer"
    install("Trainer.__init__", _attaching_init(config), key=(kind, config))
