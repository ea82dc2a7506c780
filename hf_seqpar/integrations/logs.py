"""Every number a Trainer (or TRL's SFTTrainer) logs equal to the plain run's.

Upstream derives them from the world size and from the token counts of the batches it sees. Under SP the world
is dp_size x sp_size and each rank sees a shard with layout padding, so, left alone, the total train batch size, the
train samples per second, the eval / test steps per second, num_input_tokens_seen, total_flos and TRL's num_tokens
come out sp_size times too large or count padding. Each is computed here from the data-parallel world and from the
record of the plain batch the collator keeps (`UnshardedRows`). Loss, grad_norm, learning rate and epoch need
nothing: they already equal the plain run's.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from ..algorithms import shard_sequence
from .collator import UNSHARDED_KEY, UnshardedRows
from .evaluation import EvalState
from .patches import read, set_attr
from .tp_training import base_of, tp_state_of
from .tp_weights import plain_parameter_ratio


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


def plain_tokens(trainer, state: EvalState, track):
    """`Trainer._track_num_input_tokens` counting the plain batch of this data-parallel rank."""

    def track_num_input_tokens_sp(inputs):
        rows = inputs.get(UNSHARDED_KEY)
        main_input = getattr(trainer.model, "main_input_name", "input_ids")
        if trainer.args.include_num_input_tokens_seen == "no" or rows is None or main_input not in inputs:
            return track(inputs)
        count = _sum_over_dp(_plain_input_tokens(trainer, state, inputs, rows, main_input), state, trainer.args.device)
        set_attr(trainer.state, "TrainerState.num_input_tokens_seen", trainer.state.num_input_tokens_seen + count)

    return track_num_input_tokens_sp


def plain_flops(trainer, state: EvalState, floating_point_ops):
    def floating_point_ops_sp(inputs):
        rows = inputs.get(UNSHARDED_KEY)
        flops = floating_point_ops(inputs)
        main_input = inputs.get(getattr(trainer.model, "main_input_name", "input_ids"))
        if rows is None or not isinstance(main_input, torch.Tensor) or not flops:
            return flops
        # The estimate is linear in the token count: SP rank 0 reports the whole rows' (no padding), the others 0.
        plain_tokens = rows.seq_len * main_input.shape[0]
        tp = tp_state_of(trainer.model)  # and in the parameter count, which tp_size > 1 splits
        flops *= 1.0 if tp is None else plain_parameter_ratio(base_of(trainer.model), tp)
        return flops / main_input.numel() * plain_tokens if state.groups.rows[1] == 0 else 0.0

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


def trl_num_tokens(trainer, state: EvalState, compute_loss):
    """TRL's SFTTrainer adds `attention_mask.sum()` (or, padding-free, `position_ids.size(1)`) gathered over the
    world to its num_tokens inside compute_loss; replace the sharded batch's count with the plain batch's. (Its
    counter appears after Trainer.__init__, where the switch happens: looked up at each call.)"""

    def compute_loss_counting_plain_tokens(model, inputs, *args, **kwargs):
        rows = inputs.get(UNSHARDED_KEY)
        before = read(trainer, "SFTTrainer._total_train_tokens", None)
        result = compute_loss(model, inputs, *args, **kwargs)
        metrics = read(trainer, "SFTTrainer._metrics", None)
        if before is not None and metrics is not None and trainer.model.training and rows is not None:
            count = rows.seq_len if rows.attention_mask_sum is None else rows.attention_mask_sum
            tokens = _sum_over_dp(count, state, trainer.args.device) // read(trainer, "SFTTrainer._tp_size", 1)
            set_attr(trainer, "SFTTrainer._total_train_tokens", before + tokens)
            metrics["train"]["num_tokens"] = [before + tokens]
        return result

    return compute_loss_counting_plain_tokens


def plain_eval_steps(trainer, state: EvalState, log):
    def log_sp(logs, *args, **kwargs):
        _plain_eval_steps(trainer, state, logs)
        return log(logs, *args, **kwargs)

    return log_sp


def plain_predict_steps(trainer, state: EvalState, predict):
    def predict_sp(*args, **kwargs):
        output = predict(*args, **kwargs)
        _plain_eval_steps(trainer, state, output.metrics)
        return output

    return predict_sp


def per_sp_group(groups, total_batch_size):
    """The total train batch size of the data-parallel world: the Trainer counts every rank (TP ranks too)."""
    return lambda args: total_batch_size(args) // groups.rows[2]


def tokens_once(trainer, groups, track):
    """Whole rows on every SP rank: the world's sum holds sp_size equal counts per data-parallel rank."""

    def track_once(inputs):
        before = trainer.state.num_input_tokens_seen
        track(inputs)
        added = (trainer.state.num_input_tokens_seen - before) // groups.sp_size
        set_attr(trainer.state, "TrainerState.num_input_tokens_seen", before + added)

    return track_once


def counted_once(groups, floating_point_ops):
    return lambda inputs: floating_point_ops(inputs) if groups.sp_rank == 0 else 0.0


def log_chains(trainer, state: EvalState) -> dict:
    """The Trainer methods that sharded batches make count wrongly, each with its wrapper (see the module
    docstring); trainer.attach composes them with evaluation's and applies them once."""
    return {
        "Trainer.get_total_train_batch_size": [functools.partial(per_sp_group, state.groups)],
        "Trainer._track_num_input_tokens": [functools.partial(plain_tokens, trainer, state)],
        "Trainer.floating_point_ops": [functools.partial(plain_flops, trainer, state)],
        "Trainer.log": [functools.partial(plain_eval_steps, trainer, state)],
        "Trainer.predict": [functools.partial(plain_predict_steps, trainer, state)],
    }


def whole_rows_log_chains(trainer, groups) -> dict:
    """The counts the Trainer sums over the world (total batch size, num_input_tokens_seen, total_flos) as the
    plain run has them when every rank of an SP group holds the same whole rows (TRL's DPO / KTO path). Timing
    rates such as eval steps per second are left as the Trainer computes them."""
    return {
        "Trainer.get_total_train_batch_size": [functools.partial(per_sp_group, groups)],
        "Trainer._track_num_input_tokens": [functools.partial(tokens_once, trainer, groups)],
        "Trainer.floating_point_ops": [functools.partial(counted_once, groups)],
    }
