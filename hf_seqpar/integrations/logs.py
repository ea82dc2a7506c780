"""Every number a Trainer (or TRL's SFTTrainer) logs equal to the plain run's.

Upstream derives them from the world size and from the token counts of the batches it sees. Under SP the world
is dp_size x sp_size and each rank sees a shard with layout padding, so, left alone, the total train batch size, the
train samples per second, the eval / test steps per second, num_input_tokens_seen, total_flos and TRL's num_tokens
come out sp_size times too large or count padding. Each is computed here from the data-parallel world and from the
record of the plain batch the collator keeps (`UnshardedRows`). Loss, grad_norm, learning rate and epoch need
nothing: they already equal the plain run's.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..algorithms import shard_sequence
from .collator import UNSHARDED_KEY, UnshardedRows
from .evaluation import EvalState


def _sum_over_dp(count: int, state: EvalState, device) -> int:
    """The plain run's world total of a count that every SP rank of a group holds for the group's rows."""
    total = torch.tensor([count], dtype=torch.int64, device=device)
    if state.groups.dp_size > 1:
        dist.all_reduce(total, group=state.groups.dp_group)
    return int(total.item())


def _plain_input_tokens(trainer, state: EvalState, inputs: dict, rows: UnshardedRows, main_input: str) -> int:
    """What `Trainer._track_num_input_tokens` counts on the plain batch of this data-parallel rank."""
    if trainer.args.include_num_input_tokens_seen == "non_padding":
        if rows.attention_mask_sum is not None:
            return rows.attention_mask_sum
        pad_token_id = getattr(trainer.processing_class, "pad_token_id", None)
        if pad_token_id is not None:  # the shards of the rows, without the layout padding the collator appended
            ids = inputs[main_input]
            in_rows = (torch.arange(rows.padded_len, device=ids.device) < rows.seq_len)[None]
            in_rows = shard_sequence(in_rows, config=state.config, groups=state.groups, dim=1)
            local = ((ids != pad_token_id) & in_rows).sum().reshape(1)
            dist.all_reduce(local, group=state.groups.sp_group)
            return int(local.item())
    return rows.seq_len * inputs[main_input].shape[0]


def _track_tokens(trainer, state: EvalState):
    track = trainer._track_num_input_tokens

    def track_num_input_tokens_sp(inputs):
        rows = inputs.get(UNSHARDED_KEY)
        main_input = getattr(trainer.model, "main_input_name", "input_ids")
        if trainer.args.include_num_input_tokens_seen == "no" or rows is None or main_input not in inputs:
            return track(inputs)
        count = _plain_input_tokens(trainer, state, inputs, rows, main_input)
        trainer.state.num_input_tokens_seen += _sum_over_dp(count, state, trainer.args.device)

    return track_num_input_tokens_sp


def _flops(trainer, state: EvalState):
    floating_point_ops = trainer.floating_point_ops

    def floating_point_ops_sp(inputs):
        rows = inputs.get(UNSHARDED_KEY)
        flops = floating_point_ops(inputs)
        main_input = inputs.get(getattr(trainer.model, "main_input_name", "input_ids"))
        if rows is None or not isinstance(main_input, torch.Tensor) or not flops:
            return flops
        # The estimate is linear in the token count: SP rank 0 reports the whole rows' (no padding), the others 0.
        plain_tokens = rows.seq_len * main_input.shape[0]
        return flops / main_input.numel() * plain_tokens if state.groups.sp_rank == 0 else 0.0

    return floating_point_ops_sp


def _plain_eval_steps(trainer, state: EvalState, metrics: dict) -> None:
    """evaluate() / predict() count steps as num_samples / (eval_batch_size * world_size); the plain world is
    the data-parallel one."""
    n = state.num_samples
    if not n:
        return
    batch = trainer.args.eval_batch_size
    ratio = math.ceil(n / (batch * state.groups.dp_size)) / math.ceil(n / (batch * trainer.args.world_size))
    for key in [k for k in metrics if k.endswith("_steps_per_second") and k != "train_steps_per_second"]:
        if f"{key.removesuffix('_steps_per_second')}_runtime" in metrics:
            metrics[key] = round(metrics[key] * ratio, 3)


def _trl_num_tokens(trainer, state: EvalState):
    """TRL's SFTTrainer adds `attention_mask.sum()` (or, padding-free, `position_ids.size(1)`) gathered over the
    world to its num_tokens inside compute_loss; replace the sharded batch's count with the plain batch's. (Its
    counter appears after Trainer.__init__, where the switch happens: looked up at each call.)"""
    compute_loss = trainer.compute_loss

    def compute_loss_counting_plain_tokens(model, inputs, *args, **kwargs):
        rows = inputs.get(UNSHARDED_KEY)
        before = getattr(trainer, "_total_train_tokens", None)
        result = compute_loss(model, inputs, *args, **kwargs)
        if before is not None and hasattr(trainer, "_metrics") and trainer.model.training and rows is not None:
            count = rows.seq_len if rows.attention_mask_sum is None else rows.attention_mask_sum
            tokens = _sum_over_dp(count, state, trainer.args.device) // getattr(trainer, "_tp_size", 1)
            trainer._total_train_tokens = before + tokens
            trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]
        return result

    return compute_loss_counting_plain_tokens


def honest_logs(trainer, state: EvalState) -> None:
    """Make this Trainer's logged counts and rates those of the plain run (see the module docstring)."""
    total_batch_size = trainer.get_total_train_batch_size
    trainer.get_total_train_batch_size = lambda args: total_batch_size(args) // state.groups.sp_size
    trainer._track_num_input_tokens = _track_tokens(trainer, state)
    trainer.floating_point_ops = _flops(trainer, state)
    log, predict = trainer.log, trainer.predict

    def log_sp(logs, *args, **kwargs):
        _plain_eval_steps(trainer, state, logs)
        return log(logs, *args, **kwargs)

    def predict_sp(*args, **kwargs):
        output = predict(*args, **kwargs)
        _plain_eval_steps(trainer, state, output.metrics)
        return output

    trainer.log, trainer.predict = log_sp, predict_sp
    trainer.compute_loss = _trl_num_tokens(trainer, state)
