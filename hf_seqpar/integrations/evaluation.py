"""Evaluation and prediction equal to the same run without SP: the eval loss, and what `compute_metrics`,
`preprocess_logits_for_metrics`, `evaluate()` and `predict()` receive.

Each rank's forward returns its shard of every row, in the collator's arrangement (left padding rolled right,
layout padding, labels shifted). `prediction_step` turns that back into what the plain run returns on this
data-parallel rank: whole rows in the base batch's order, with the base batch's own labels (and, for
`include_for_metrics=["inputs"]`, its input_ids). The eval loop then gathers over the data-parallel group only:
every SP rank of a group holds the same rows, so each sample is counted once and accelerate's cut of the last,
padded batch keeps its plain meaning.

`preprocess_logits_for_metrics` runs on the shard, before the gather (full-vocabulary logits never exist whole),
when on this batch it returns one entry per position that depends on that position alone: checked by running it
again on a random half of the positions in random order (a shift, a cumulative or a sequence-wide operation, or
anything reading the position index, gives other values there). Otherwise the logits are gathered first and it
runs on whole rows, as without SP: exact either way, the second costs the memory of the full logits.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..algorithms import gather_sequence, shard_sequence
from ..config import SeqParConfig
from ..mesh import SeqParGroups
from .collator import IGNORE_INDEX, UNSHARDED_KEY, UnshardedRows
from .loss import token_weighted_mean
from .patches import set_attr, world_size
from .tp_collectives import gather_tp_pieces, tp_piece
from .transformers import DOCS_KEY

PROBE_POSITIONS = 32  # positions the per-token check of preprocess_logits_for_metrics re-runs on


@dataclass
class EvalState:
    """One Trainer's switches for its eval loop (set by `evaluation_loop`, read by `prediction_step`)."""

    config: SeqParConfig  # resolved for the model
    groups: SeqParGroups
    preprocess: object = None  # the Trainer's preprocess_logits_for_metrics while its eval loop runs
    num_samples: int | None = None  # of the last eval loop (logs.py recomputes steps per second from it)
    probe_rng: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))


def startup_line(config: SeqParConfig, groups: SeqParGroups, input_ids: torch.Tensor) -> str:
    ulysses, ring = config.split
    batch, seq_local = input_ids.shape
    tp = f" x TP {groups.tp_size} (Megatron-SP)" if groups.tp_size > 1 else ""
    return (
        f"hf_seqpar: world {world_size()} = DP {groups.dp_size} x SP {groups.sp_size} (ulysses {ulysses} x ring "
        f"{ring}){tp}, mode {config.mode}, layout {config.resolved_layout}, {batch * seq_local} tokens per rank "
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
    group, _, size = groups.rows  # with tp_size > 1 each TP rank computed its piece's loss
    if normalized_by_world:
        total = loss.clone()
        dist.all_reduce(total, group=group)
        return total / size
    n_local = n_local.to(device=loss.device)
    local_sum = torch.where(n_local > 0, loss * n_local, torch.zeros_like(loss))  # an empty shard's mean is NaN
    return token_weighted_mean(local_sum, n_local, group=group)


def exact_compute_loss(trainer, state: EvalState, compute_loss):
    """`compute_loss` (bound: a subclass's override, SFTTrainer's, included) on sharded batches; eval losses as the
    plain run reports them."""
    signature = inspect.signature(compute_loss)
    announced = []

    def compute_loss_sp(model, inputs, *args, **kwargs):
        if DOCS_KEY not in inputs:
            raise RuntimeError(
                f"hf_seqpar: this batch was not sharded by hf_seqpar (no '{DOCS_KEY}'): the Trainer's "
                "data_collator was replaced "
                "after Trainer.__init__, or a custom get_*_dataloader bypasses it"
            )
        inputs.pop(UNSHARDED_KEY, None)  # a record for metrics and logs, no model input
        if not announced:
            announced.append(True)
            if dist.get_rank() == 0:
                print(startup_line(state.config, state.groups, inputs["input_ids"]), flush=True)
        if model.training:
            return compute_loss(model, inputs, *args, **kwargs)
        n_local = (inputs["shift_labels"] != IGNORE_INDEX).sum()
        result = compute_loss(model, inputs, *args, **kwargs)
        num_items = signature.bind(model, inputs, *args, **kwargs).arguments.get("num_items_in_batch")
        loss = result[0] if isinstance(result, tuple) else result
        loss = sp_group_eval_loss(loss, n_local, num_items is not None, state.groups)
        return (loss, *result[1:]) if isinstance(result, tuple) else loss

    return compute_loss_sp


# ---- whole rows from shards ---------------------------------------------------------------------------------------


def _map_sequence_tensors(obj, fn, shard_shape: tuple[int, int]):
    """Apply `fn` to every tensor of a nested tuple / list / dict; each must be [B, S_local, ...]."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() < 2 or tuple(obj.shape[:2]) != shard_shape:
            raise NotImplementedError(
                f"hf_seqpar: the model returned a {tuple(obj.shape)} output next to [batch, seq_local] = "
                f"{list(shard_shape)} logits; only per-token outputs can be gathered into whole rows. Leave it out "
                "with the Trainer's ignore_keys (or config.keys_to_ignore_at_inference)"
            )
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)({k: _map_sequence_tensors(v, fn, shard_shape) for k, v in obj.items()})
    if isinstance(obj, tuple | list):
        return type(obj)(_map_sequence_tensors(v, fn, shard_shape) for v in obj)
    return obj


def whole_rows(local: torch.Tensor, rows: UnshardedRows, state: EvalState, piece: bool = True) -> torch.Tensor:
    """This rank's [B, S_local, ...] shard -> [B, S, ...] whole rows in the base batch's order, on every SP rank.
    `piece`: with tp_size > 1, `local` is this TP rank's piece of the shard (logits; model inputs are not)."""
    if piece and state.groups.tp_size > 1:
        local = gather_tp_pieces(local, state.groups)
    full = gather_sequence(local.contiguous(), config=state.config, groups=state.groups, dim=1)
    return rows.restore(full)


def _is_per_token(preprocess, logits: torch.Tensor, labels, preds, rng: torch.Generator) -> bool:
    """Whether `preds = preprocess(logits, labels)` holds one entry per position that depends on that position's
    logits and labels alone, as far as re-running it on a random half of the positions in random order tells."""
    batch, n = logits.shape[:2]
    if n < 2 or not isinstance(preds, torch.Tensor) or tuple(preds.shape[:2]) != (batch, n):
        return False
    pick = torch.randperm(n, generator=rng)[: min(PROBE_POSITIONS, n // 2)].to(logits.device)
    again = preprocess(logits[:, pick], None if labels is None else labels[:, pick])
    return isinstance(again, torch.Tensor) and torch.equal(again, preds[:, pick])


def _agree(flag: bool, device) -> bool:
    """True on every rank when it is True on all: the two paths run different collectives, so the world decides."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _pad_rows(x: torch.Tensor, length: int, column: torch.Tensor) -> torch.Tensor:
    """Pad [B, S, ...] to `length` along dim 1 with copies of the [B, 1, ...] `column`."""
    if x.shape[1] >= length:
        return x
    return torch.cat([x, column.expand((x.shape[0], length - x.shape[1]) + x.shape[2:]).to(x.dtype)], 1)


def _preprocessed(trainer, state: EvalState, logits, labels, rows: UnshardedRows, shard_shape):
    """`preprocess_logits_for_metrics` of the plain run's padded logits and labels, on whole rows."""
    preprocess, accelerator = state.preprocess, trainer.accelerator
    if isinstance(logits, torch.Tensor) and tuple(logits.shape[:2]) == shard_shape:
        shard_labels = None
        if labels is not None:
            arranged = rows.arrange(labels, IGNORE_INDEX)
            shard_labels = shard_sequence(arranged, config=state.config, groups=state.groups, dim=1)
            shard_labels = tp_piece(shard_labels, state.groups)
        preds = preprocess(logits, shard_labels)
        per_token = _is_per_token(preprocess, logits, shard_labels, preds, state.probe_rng)
        if _agree(per_token, logits.device):
            preds = whole_rows(preds, rows, state)
            # Without SP, eval_loop pads logits and labels with -100 to the longest row of the world first.
            length = rows.seq_len
            if state.groups.dp_size > 1:
                longest = torch.tensor([length], device=logits.device)
                dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=state.groups.dp_group)
                length = int(longest.item())
            if length > rows.seq_len:
                pad_column = preprocess(
                    logits[:, :1].new_full(logits[:, :1].shape, IGNORE_INDEX),
                    None if labels is None else labels[:, :1].new_full(labels[:, :1].shape, IGNORE_INDEX),
                )
                preds = _pad_rows(preds, length, pad_column)
            return preds
    logits = _map_sequence_tensors(logits, functools.partial(whole_rows, rows=rows, state=state), shard_shape)
    logits = accelerator.pad_across_processes(logits, dim=1, pad_index=IGNORE_INDEX)
    if labels is not None:
        labels = accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX)
    return preprocess(logits, labels)


def exact_prediction_step(trainer, state: EvalState, prediction_step):
    def prediction_step_sp(model, inputs, prediction_loss_only, ignore_keys=None):
        sharded = dict(inputs)
        rows: UnshardedRows | None = sharded.pop(UNSHARDED_KEY, None)
        if rows is None:
            raise RuntimeError(
                f"hf_seqpar: this eval batch has no '{UNSHARDED_KEY}': it did not come from the Trainer's "
                "hf_seqpar collator "
                "(a custom get_eval_dataloader, or a data_collator replaced after Trainer.__init__)"
            )
        loss, logits, _ = prediction_step(model, sharded, prediction_loss_only, ignore_keys=ignore_keys)
        labels = None if rows.labels is None else rows.labels.to(trainer.args.device)
        if rows.labels is None:
            loss = None  # the plain batch has no labels, so the plain step computes no loss
        batch, seq_local = sharded["input_ids"].shape[:2]
        shard_shape = (batch, seq_local // state.groups.tp_size)  # the logits of this TP rank's piece
        main_input = getattr(trainer.model, "main_input_name", "input_ids")
        if "inputs" in trainer.args.include_for_metrics and not prediction_loss_only and main_input in sharded:
            # eval_loop reads the model inputs for metrics from its own batch dict, after this step
            base = rows.input_ids if main_input == "input_ids" else None  # the padding ids the collator replaced
            inputs[main_input] = base if base is not None else whole_rows(sharded[main_input], rows, state, False)
        if prediction_loss_only or logits is None:
            return loss, None if prediction_loss_only else logits, None if prediction_loss_only else labels
        if state.preprocess is not None:
            return loss, _preprocessed(trainer, state, logits, labels, rows, shard_shape), labels
        return (
            loss,
            _map_sequence_tensors(logits, functools.partial(whole_rows, rows=rows, state=state), shard_shape),
            labels,
        )

    return prediction_step_sp


# ---- the eval loop: gather over data-parallel ranks only -------------------------------------------------------


def _gather_dp(data, groups: SeqParGroups, use_gather_object: bool):
    """accelerate's gather / gather_object over the data-parallel group, which is what the plain run's world is."""
    from accelerate.utils import recursively_apply

    if groups.dp_size == 1:
        return data
    if use_gather_object:
        gathered = [None] * groups.dp_size
        dist.all_gather_object(gathered, data, group=groups.dp_group)
        return [item for part in gathered for item in part]

    def gather_one(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()[None] if tensor.dim() == 0 else tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(groups.dp_size)]
        dist.all_gather(parts, tensor, group=groups.dp_group)
        return torch.cat(parts)

    return recursively_apply(gather_one, data, error_on_other_type=True)


def dp_gather_for_metrics(accelerator, groups: SeqParGroups):
    """`Accelerator.gather_for_metrics` as the plain run computes it: over the data-parallel ranks, then the last
    batch cut to the `remainder` real samples (the loaders are sharded by data-parallel rank, so it counts those)."""
    from accelerate.utils import recursively_apply

    def gather_for_metrics_dp(input_data, use_gather_object=False):
        try:
            recursively_apply(lambda x: x, input_data, error_on_other_type=True)
            all_tensors = True
        except TypeError:
            all_tensors = False
        use_gather_object = use_gather_object or not all_tensors
        data = _gather_dp(input_data, groups, use_gather_object)
        gradient_state = accelerator.gradient_state
        if not gradient_state.end_of_dataloader or gradient_state.remainder <= 0:
            return data
        remainder = gradient_state.remainder
        if use_gather_object:
            return data[:remainder]
        return recursively_apply(lambda tensor: tensor[:remainder], data)

    return gather_for_metrics_dp


def exact_evaluation_loop(trainer, state: EvalState, evaluation_loop):
    def evaluation_loop_sp(*args, **kwargs):
        gather = dp_gather_for_metrics(trainer.accelerator, state.groups)
        gather = functools.partial(gather, use_gather_object=trainer.args.eval_use_gather_object)
        set_attr(trainer, "Trainer.gather_function", gather)
        # prediction_step applies it (on the shard when it acts per token); the loop must not apply it again
        state.preprocess = trainer.preprocess_logits_for_metrics
        set_attr(trainer, "Trainer.preprocess_logits_for_metrics", None)
        try:
            output = evaluation_loop(*args, **kwargs)
        finally:
            set_attr(trainer, "Trainer.preprocess_logits_for_metrics", state.preprocess)
            state.preprocess = None
        state.num_samples = output.num_samples
        return output

    return evaluation_loop_sp
