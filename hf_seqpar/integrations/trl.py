"""TRL trainers under sequence parallelism: DPO and KTO exact, every other TRL trainer refused at construction.

SFTTrainer takes the generic path of `trainer.attach` (sharded batches, loss through `num_items_in_batch`). DPO and
KTO score whole sequences instead: they call the model with `fused_lm_head=True` (TRL's fused LM head, which returns
per-token log-probabilities without logits) and reduce those per sequence into a preference loss, rewards and
metrics. Under SP their batches stay whole on every rank of a group (`WholeSequenceCollator`); the fused forward is
wrapped (`sharded_fused_forward`) to cut each call's sequences with `layout`, run the model on this rank's shard, and
all-gather the per-token outputs back into whole rows. TRL's own loss code then sees exactly the tensors of the plain
run, for every loss type, `ld_alpha`, WPO weighting, and every logged metric. The gather moves [rows, seq] values per
output field, nothing of size hidden or vocab.

Gradients: every SP rank computes the same loss from the same gathered rows. The gather's backward hands each rank
its own positions of that (whole) gradient times sp_size, because DDP / FSDP / ZeRO average gradients over the world,
which holds sp_size ranks per data-parallel group; the sum over a group of the shards' contributions is the gradient
of the plain run (DESIGN.md, "Loss and gradients").

TRL is imported lazily and only if the script already imported it: hf_seqpar does not need TRL.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import layout
from ..config import SeqParConfig
from ..kernels import DocumentOffsets
from ..mesh import SeqParGroups
from .collator import IGNORE_INDEX, SequenceShardingCollator
from .evaluation import dp_gather_for_metrics, startup_line
from .patches import patch_instance, read, set_attr
from .transformers import DOCS_KEY, apply_sequence_parallel

GENERIC, WHOLE_SEQUENCES = "generic", "whole-sequences"
# The first TRL class in a trainer's MRO decides; a subclass TRL ships with its own loss is refused until proven.
TRL_TRAINERS = {
    "trl.trainer.sft_trainer.SFTTrainer": GENERIC,
    "trl.trainer.dpo_trainer.DPOTrainer": WHOLE_SEQUENCES,
    "trl.trainer.kto_trainer.KTOTrainer": WHOLE_SEQUENCES,
    "trl.experimental.kto.KTOTrainer": WHOLE_SEQUENCES,  # the deprecated import path of the same trainer
}
_ONLINE = (
    "it samples completions on every rank, then gathers rewards and slices advantages by global process index, "
    "which would count each data-parallel rank's samples once per rank of its sequence-parallel group"
)
_WHY_NOT = {
    "RewardTrainer": "it scores each sequence at its last real token, which only one rank of the group holds",
    "GRPOTrainer": _ONLINE,
    "RLOOTrainer": _ONLINE,
    "DistillationTrainer": "its loss compares student and teacher distributions over the vocabulary at every "
    "position (and may sample completions on every rank), which hf_seqpar does not split by sequence",
}
FORWARD_MARK = "__hf_seqpar_whole_sequences__"
# Keyword arguments of TRL's fused forward that the wrapper understands; any other non-None one is refused.
_UNDERSTOOD = {"input_ids", "attention_mask", "labels", "use_cache", "fused_lm_head", "shift_labels"}
_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def trl_class(trainer) -> type | None:
    """The first class of TRL in the trainer's MRO (its own class or the one a user subclassed), or None."""
    if "trl" not in sys.modules:  # a script that never imported TRL builds no TRL trainer
        return None
    return next((c for c in type(trainer).__mro__ if c.__module__.split(".")[0] == "trl"), None)


def check_trl_trainer(trainer) -> str | None:
    """How a TRL trainer runs under SP (GENERIC or WHOLE_SEQUENCES); None for a trainer that is not TRL's.
    Raises NotImplementedError for the TRL trainers hf_seqpar cannot make exact."""
    cls = trl_class(trainer)
    if cls is None:
        return None
    path = f"{cls.__module__}.{cls.__qualname__}"
    if path in TRL_TRAINERS:
        return TRL_TRAINERS[path]
    why = _WHY_NOT.get(cls.__name__, "its loss has not been proven exact when sequences are split across ranks")
    supported = sorted({p.rsplit(".", 1)[1] for p in TRL_TRAINERS})
    raise NotImplementedError(
        f"hf_seqpar: {cls.__name__} ({path}) is not supported under sequence parallelism: {why}. Run it without "
        f"sequence parallelism (sp_size=1: plain `accelerate launch`, or drop the 'hf_seqpar:' section); hf_seqpar "
        f"supports the TRL trainers {supported}"
    )


def check_whole_sequence_trainer(trainer) -> None:
    """Refuse what a DPO / KTO trainer cannot do exactly on the whole-sequence path (before anything is switched)."""
    name = type(trainer).__name__
    if read(trainer, "DPOTrainer._is_vision_dataset", False):
        raise NotImplementedError(
            f"hf_seqpar: {name} with a vision dataset passes image features that cannot be split by sequence; "
            "train vision-language preference data without sequence parallelism"
        )
    if trainer.compute_metrics is not None:
        raise NotImplementedError(
            f"hf_seqpar: {name}(compute_metrics=...) needs the logits of whole sequences, which no rank holds under "
            "sequence parallelism; drop compute_metrics (the trainer's own rewards/logps metrics are exact)"
        )
    if getattr(trainer.args, "train_sampling_strategy", None) == "batch_rebalance":
        raise ValueError(
            "hf_seqpar: train_sampling_strategy='batch_rebalance' deals batches by global rank, so the ranks of a "
            "sequence-parallel group would get different samples; use 'random' or 'sequential'"
        )


def whole_sequence_chains(trainer, config: SeqParConfig, groups: SeqParGroups) -> dict:
    """Switch a DPO / KTO trainer (its model already switched, `config` resolved for it) to the whole-sequence
    path: its collator, its accelerator's metric gathers; returns the trainer methods to wrap, for trainer.attach
    to compose with the log counts and apply once."""
    state = WholeSequenceState(config=config, groups=groups)
    set_attr(
        trainer, "Trainer.data_collator", WholeSequenceCollator(trainer.data_collator, config=config, groups=groups)
    )
    # Every rank of an SP group holds the same whole rows, so the trainer's metric gathers (token counts, entropy,
    # precomputed reference log-probs written back by row, eval losses) run over the data-parallel ranks only:
    # exactly the plain run's gathers. (Its plain `gather`s of per-row rewards repeat each row sp_size times, which
    # leaves their means unchanged.)
    gather_for_metrics = dp_gather_for_metrics(trainer.accelerator, groups)
    patch_instance(trainer.accelerator, {"Accelerator.gather_for_metrics": [lambda _: gather_for_metrics]})
    use_gather_object = trainer.args.eval_use_gather_object
    set_attr(
        trainer, "Trainer.gather_function", functools.partial(gather_for_metrics, use_gather_object=use_gather_object)
    )
    first = functools.partial(_wrapping_forwards_first, trainer=trainer, state=state)
    chains = {"Trainer.compute_loss": [first]}
    if hasattr(trainer, "_precompute_ref_logps"):  # runs at the end of __init__, before any compute_loss
        chains["DPOTrainer._precompute_ref_logps"] = [first]
    return chains


class WholeSequenceState:
    """What the wrapped forwards of one trainer share: the config, the groups, and whether the startup line ran."""

    def __init__(self, config: SeqParConfig, groups: SeqParGroups) -> None:
        self.config = config
        self.groups = groups
        self.multiple = layout.required_multiple(groups.sp_size, config.resolved_layout)
        self.announced = False

    def placement(self, seq_len: int) -> layout.Placement:
        padded = max(self.multiple, -(-seq_len // self.multiple) * self.multiple)
        return layout.Placement.build(padded, self.groups.sp_size, self.config.resolved_layout)


class WholeSequenceCollator(SequenceShardingCollator):
    """The base collator's batch, whole: the fused forward shards each call (see the module docstring). A
    `SequenceShardingCollator`, so data loaders are cut by data-parallel rank and every rank of an SP group gets
    the same rows."""

    def __call__(self, features):
        return self.base_collator(features)


class GatherSequence(torch.autograd.Function):
    """[rows, S_pad / sp] shard of this rank -> [rows, S_pad] whole rows, over the SP group (all-gather + `layout`).

    Backward: [rows, S_pad] gradient -> this rank's positions of it, times sp_size. Every rank of the group computes
    the same loss from the same whole rows, so each holds the whole gradient already (no communication); the factor
    undoes the average over the sp_size ranks of each data-parallel group that DDP / FSDP / ZeRO take."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, placement: layout.Placement, groups: SeqParGroups) -> torch.Tensor:
        ctx.placement, ctx.rank = placement, groups.sp_rank
        wire = shard.to(torch.uint8) if shard.dtype == torch.bool else shard.contiguous()  # gloo has no bool
        shards = [torch.empty_like(wire) for _ in range(placement.world)]
        dist.all_gather(shards, wire, group=groups.sp_group)
        whole = layout.unshard(shards, placement, dim=1)
        return whole.bool() if shard.dtype == torch.bool else whole

    @staticmethod
    def backward(ctx, grad_whole: torch.Tensor):
        grad = layout.shard(grad_whole, ctx.placement, ctx.rank, dim=1) * ctx.placement.world
        return grad, None, None


def shard_rows(input_ids, attention_mask, labels, placement: layout.Placement, rank: int) -> dict:
    """The fused forward's arguments for this rank's shard of padded rows [N, S] (padded to S_pad first).

    Every token stays where the plain forward has it, at the position it gets there (0, 1, ... from the row start,
    as without `position_ids`). The real tokens of a row (one run of attention_mask ones: left, right or both-side
    padding) form one document of `seqpar_cu_seqlens` and the padding on either side documents of their own, so a
    real token attends to what it attends to under the plain run's mask. Labels are shifted on the whole row
    (`shift_labels`, which TRL's fused head scores as given)."""
    n, s = input_ids.shape
    s_pad = placement.seq_len
    idx = torch.arange(s_pad, device=input_ids.device)
    real = torch.zeros(n, s_pad, dtype=torch.bool, device=input_ids.device)
    real[:, :s] = True if attention_mask is None else attention_mask.bool()
    lead = (real.cumsum(1) == 0).sum(1)  # leading padding of each row
    end = lead + real.sum(1)
    if not torch.equal(real, (idx >= lead[:, None]) & (idx < end[:, None])):
        raise NotImplementedError(
            "hf_seqpar: attention_mask has padding between real tokens; only rows padded on the left and/or the "
            "right can be split by sequence"
        )
    if labels is None:
        raise ValueError("hf_seqpar: TRL's fused LM head was called without labels")
    shift_labels = F.pad(labels[:, 1:], (0, s_pad - s + 1), value=IGNORE_INDEX)
    scored = real & F.pad(real[:, 1:], (0, 1), value=False)  # a real token predicting a real token
    if (shift_labels[~scored] != IGNORE_INDEX).any():
        raise NotImplementedError(
            "hf_seqpar: a label is set where padding predicts or is predicted; TRL's trainers set those to -100"
        )
    offsets = [sorted({0, a, b, s_pad}) for a, b in zip(lead.tolist(), end.tolist(), strict=True)]
    width = max(len(row) for row in offsets)
    cu_seqlens = torch.tensor([row + [s_pad] * (width - len(row)) for row in offsets], dtype=torch.int32)
    whole = {
        # the padding's token ids never matter: its labels are -100 and only padding attends to it
        "input_ids": F.pad(input_ids, (0, s_pad - s), value=0),
        "position_ids": idx.expand(n, s_pad),
        "shift_labels": shift_labels,
    }
    sharded = {key: layout.shard(value, placement, rank, dim=1) for key, value in whole.items()}
    return {**sharded, DOCS_KEY: DocumentOffsets.from_padded(cu_seqlens)}  # host-side: attention reads it, no sync


def sharded_fused_forward(fused_forward, state: WholeSequenceState, model_name: str):
    """Wrap TRL's fused forward (`model.forward` after `add_fused_lm_head`): same call, same outputs as the plain
    run, computed on this rank's shard (see the module docstring)."""

    def forward(*args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            raise NotImplementedError(
                f"hf_seqpar: {model_name} was called for logits (return_outputs / compute_metrics / a custom "
                "override); under sequence parallelism DPO and KTO only support TRL's fused log-probabilities"
            )
        if args:
            raise NotImplementedError(f"hf_seqpar: {model_name} got positional arguments; pass input_ids= by name")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _UNDERSTOOD)
        if unknown or kwargs.get("use_cache"):
            raise NotImplementedError(
                f"hf_seqpar: {model_name} got {unknown or ['use_cache=True']}, which hf_seqpar cannot split by "
                "sequence (MoE router logits, multimodal inputs, caches); train this model without sequence "
                "parallelism"
            )
        if kwargs.get("shift_labels") is not None:
            raise NotImplementedError(f"hf_seqpar: {model_name} got shift_labels; pass whole-row labels")
        input_ids = kwargs["input_ids"]
        placement = state.placement(input_ids.shape[1])
        sharded = shard_rows(
            input_ids, kwargs.get("attention_mask"), kwargs.get("labels"), placement, state.groups.sp_rank
        )
        if not state.announced and dist.get_rank() == 0:
            print(startup_line(state.config, state.groups, sharded["input_ids"]), flush=True)
        state.announced = True
        out = fused_forward(**sharded, use_cache=False, fused_lm_head=True)
        s = input_ids.shape[1]
        fields = {}
        for name in _PER_TOKEN:
            value = getattr(out, name, None)
            fields[name] = None if value is None else GatherSequence.apply(value, placement, state.groups)[:, : s - 1]
        loss = -fields["log_probs"].sum() / fields["label_mask"].sum().clamp(min=1)  # as TRL's fused head
        return type(out)(loss=loss, aux_loss=None, **fields)

    setattr(forward, FORWARD_MARK, True)
    return functools.wraps(fused_forward)(forward)


def _wrap_fused_forwards(trainer, state: WholeSequenceState) -> None:
    """Wrap the fused forward of the policy and of the reference model, once (TRL adds its fused heads at the end
    of the trainer's `__init__`, after `attach`). The reference model is switched to SP attention here too."""
    from accelerate.utils import is_peft_model

    for role, model in (("policy", trainer.model), ("reference model", getattr(trainer, "ref_model", None))):
        if model is None:
            continue
        model = trainer.accelerator.unwrap_model(model)
        lm = model.get_base_model() if is_peft_model(model) else model
        forward = lm.__dict__.get("forward")
        if forward is None:
            raise RuntimeError(
                f"hf_seqpar: the {role} of {type(trainer).__name__} has no fused LM head from TRL's "
                "add_fused_lm_head; this TRL version computes log-probabilities in a way hf_seqpar does not know"
            )
        if getattr(forward, FORWARD_MARK, False):
            continue
        if role == "reference model":  # built (or passed) after attach, with its own attention
            apply_sequence_parallel(model, config=state.config, groups=state.groups)
        text_config = lm.config.get_text_config()
        if getattr(text_config, "output_router_logits", False):
            raise NotImplementedError(
                f"hf_seqpar: {type(lm).__name__} returns MoE router logits (output_router_logits=True); their "
                "load-balancing loss is not exact over sequence shards. Set output_router_logits=False"
            )
        fused = functools.partial(sharded_fused_forward, state=state, model_name=type(lm).__name__)
        patch_instance(lm, {"PreTrainedModel.forward (TRL fused head)": [fused]})


def _wrapping_forwards_first(method, trainer, state: WholeSequenceState):
    """`method` (bound), after making sure the fused forwards of the trainer's models are wrapped."""

    def wrapped(*args, **kwargs):
        _wrap_fused_forwards(trainer, state)
        return method(*args, **kwargs)

    return wrapped
