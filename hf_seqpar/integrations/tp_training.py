"""Training a TP-split model (tensor_parallel.py) through accelerate and the Trainer: data-parallel gradients,
`clip_grad_norm_`, and checkpoints that equal the plain run's.

- `Accelerator.prepare` wraps the model in DistributedDataParallel over the world; the split parameters are kept
  out of it (tensor_parallel._keep_out_of_ddp) and reduced over the ranks holding the same shard instead.
- `clip_grad_norm_` measures the whole model's gradient (split parameters summed over the TP group), so every rank
  clips by the plain run's norm and logs the plain run's grad_norm.
- `save_model` writes the whole tensors (gathered over the TP group) in the plain model's format; loading cuts them
  back (a load pre-hook). The optimizer's state of the split parameters differs per TP rank: each TP rank's
  is saved beside the Trainer's `optimizer.pt` (TP rank 0's) and loaded on resume.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from .patches import patch_instance, read
from .tensor_parallel import TensorParallelState, tp_state
from .tp_weights import clip_grad_norm, full_state_dict, reduce_shard_grads

OPTIMIZER_PIECE = "optimizer_tp{rank}.pt"  # the optimizer state of TP rank > 0 (rank 0's is the Trainer's own)


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The PreTrainedModel inside a DDP wrap and / or a PeftModel."""
    inner = getattr(model, "module", model)  # DDP
    get_base_model = getattr(inner, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else inner


def tp_state_of(model) -> TensorParallelState | None:
    return tp_state(base_of(model)) if isinstance(model, torch.nn.Module) else None


def after_prepare(accelerator, prepared) -> None:
    """After the stock `Accelerator.prepare`: for each prepared TP-split model, shard gradients reduced and
    `clip_grad_norm_` made whole-model (once per accelerator)."""
    results = prepared if isinstance(prepared, tuple) else (prepared,)
    for obj in results:
        state = tp_state_of(obj)
        if state is None:
            continue
        if accelerator.mixed_precision == "fp16":
            raise NotImplementedError(
                "hf_seqpar: fp16 mixed precision skips a step on the ranks whose own gradients overflowed, and "
                "tensor-parallel ranks hold different gradient shards; use bf16 or tp_size=1"
            )
        if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
            reduce_shard_grads(obj, state, dist.get_world_size())
        elif dist.get_world_size() > 1 and any(p.requires_grad for p in obj.parameters()):
            raise NotImplementedError(
                f"hf_seqpar: tensor parallelism trains with accelerate's DistributedDataParallel only; this "
                f"accelerator prepared {type(obj).__name__} (FSDP / DeepSpeed with tp_size > 1 are not supported); "
                "use tp_size=1 with them"
            )
        if "clip_grad_norm_" not in accelerator.__dict__:
            patch_instance(accelerator, {"Accelerator.clip_grad_norm_": [functools.partial(_whole_norm, state)]})


def _whole_norm(state: TensorParallelState, clip):
    accelerator = clip.__self__

    def clip_grad_norm_tp(parameters, max_norm, norm_type=2):
        accelerator.unscale_gradients()  # what the stock method does first (mixed precision's scaler)
        return clip_grad_norm(list(parameters), max_norm, norm_type, state)

    return clip_grad_norm_tp


def _whole_weights(trainer, state: TensorParallelState, save_model):
    """`Trainer.save_model` writing the whole (gathered) tensors; every rank takes part in the gather."""

    def save_model_tp(output_dir=None, _internal_call=False):
        output_dir = output_dir if output_dir is not None else trainer.args.output_dir
        peft = callable(getattr(trainer.model, "get_base_model", None))
        whole = full_state_dict(trainer.model, state, trainable_only=peft)
        if trainer.args.should_save:
            read(trainer, "Trainer._save")(output_dir, state_dict=whole)
        if trainer.args.push_to_hub and not _internal_call:
            trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)

    return save_model_tp


def _piece_path(output_dir: str, state: TensorParallelState) -> str:
    return os.path.join(output_dir, OPTIMIZER_PIECE.format(rank=state.groups.tp_rank))


def _save_optimizer_pieces(trainer, state: TensorParallelState, save):
    def save_tp(output_dir):
        save(output_dir)
        groups = state.groups
        if groups.tp_rank > 0 and groups.dp_rank == 0 and groups.sp_rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(trainer.optimizer.state_dict(), _piece_path(output_dir, state))

    return save_tp


def _load_optimizer_pieces(trainer, state: TensorParallelState, load):
    def load_tp(checkpoint):
        load(checkpoint)
        if checkpoint is None or state.groups.tp_rank == 0:
            return
        path = _piece_path(checkpoint, state)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"hf_seqpar: {path} is missing: the checkpoint holds TP rank 0's optimizer state only, and TP rank "
                f"{state.groups.tp_rank}'s split parameters would resume with another rank's moments"
            )
        piece = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict moves it to the params
        trainer.optimizer.load_state_dict(piece)

    return load_tp


def split_models_only(move):
    """`Trainer._move_model_to_device` with tp_size > 1: a model not split yet (the Trainer's __init__ places it
    before hf_seqpar's attach splits it) stays where it is until `move_split_model`; a split one moves."""

    def move_when_split(model, device):
        if tp_state_of(model) is None:
            move_when_split.deferred = device
            return None
        return move(model, device)

    move_when_split.deferred = None  # where the Trainer's __init__ wanted the unsplit model
    return move_when_split


def move_split_model(trainer) -> None:
    """After attach: the placement the Trainer's __init__ asked for, now of the split model."""
    move = trainer._move_model_to_device
    device, move.deferred = move.deferred, None
    if device is not None:
        move(trainer.model, device)


def trainer_chains(trainer) -> dict:
    """The Trainer methods a TP-split model needs rewired (trainer.attach applies them with the others)."""
    state = tp_state_of(trainer.model)
    if state is None:
        return {}
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise NotImplementedError(
            "hf_seqpar: tp_size > 1 trains with DistributedDataParallel; FSDP / DeepSpeed with tensor parallelism "
            "are not supported yet: use tp_size=1 (sequence parallelism composes with both)"
        )
    if trainer.args.fp16:
        raise NotImplementedError(
            "hf_seqpar: fp16=True skips a step on the ranks whose own gradients overflowed, and tensor-parallel ranks "
            "hold different gradient shards, so they could skip different steps; use bf16=True or tp_size=1"
        )
    if getattr(trainer.args, "neftune_noise_alpha", None):
        raise NotImplementedError(
            f"hf_seqpar: neftune_noise_alpha={trainer.args.neftune_noise_alpha} scales embedding noise by the length "
            "it sees, one tensor-parallel piece here, and TP ranks share one generator; set it to None or tp_size=1"
        )
    return {
        "Trainer.save_model": [functools.partial(_whole_weights, trainer, state)],
        "Trainer._save_optimizer_and_scheduler": [functools.partial(_save_optimizer_pieces, trainer, state)],
        "Trainer._load_optimizer_and_scheduler": [functools.partial(_load_optimizer_pieces, trainer, state)],
    }
