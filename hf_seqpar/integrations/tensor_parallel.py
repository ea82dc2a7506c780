"""Tensor parallelism with sequence-parallel regions (Megatron-SP) inside a Hugging Face decoder, composed with
hf_seqpar's sequence parallelism (`SeqParConfig.tp_size`).

Layout of one sharded forward, on tensor-parallel rank t of tp_size T (its SP shard holds S_sp tokens):
- Between blocks (embedding output, norms, residual adds, final norm, lm_head and the loss) each TP rank holds
  the contiguous piece t of its SP shard, S_sp / T tokens; the collator gives it the labels of that piece only.
- A block of the model's tp plan (attention, MLP: the parent module of a row-parallel linear) starts with an
  all-gather of the sequence over the TP group and ends with a reduce-scatter. Inside, column-parallel linears hold
  1/T of the output features (whole heads), row-parallel ones 1/T of the input features, so the block's output is
  a partial sum that the reduce-scatter adds up. Attention runs on the TP-local heads across the SP group.
- Forwards of unsharded batches (generate, a plain prompt) run plain TP: identity into a block, all-reduce out;
  every TP rank must take part in them.

Gradients. A weight shard's gradient already holds every TP rank's loss contribution (the collectives' backward
carries them), so shards sum over the dp x sp ranks that hold the same shard. Replicated parameters (norms,
embeddings, LoRA's replicated factor) get one partial gradient per distinct token piece or head group, which sum
over the whole world exactly like SP's partial gradients. LoRA: the column-parallel B and the row-parallel A are
sharded with their base weight; the other factor is replicated. LoRA dropout on a row-parallel input draws the mask
of all features and keeps this rank's slice: the plain run's distribution, no pattern repeated across TP ranks.
"""

from __future__ import annotations

import fnmatch
import logging

import torch

from ..mesh import SeqParGroups
from .patches import patch_instance
from .tp_collectives import all_gather_along, all_reduce_copy, reduce_scatter_along, tp_piece
from .tp_weights import TensorParallelState, keep_out_of_ddp, load_piece_hook, whole_saves_only

logger = logging.getLogger("hf_seqpar")
TP_ATTR = "_hf_seqpar_tp"  # on the base model: its TensorParallelState
SHARD_DIM = {"colwise": 0, "rowwise": 1}  # nn.Linear weight [out, in]: the dimension each style splits
_REPLICATED_STYLES = {"replicated_with_grad_allreduce"}  # kept whole: its partial gradients sum like any replica
# hf_seqpar's plan for decoders whose config declares none (the names of Llama-like families).
OWN_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
_DROPOUT_FIELDS = ("hidden_dropout", "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "embedding_dropout")


class _GatherSequence(torch.autograd.Function):
    """Forward: the TP pieces of the sequence -> the whole SP shard. Backward: reduce-scatter (every TP rank's
    block used the whole shard; each piece's gradient is the sum of their contributions)."""

    @staticmethod
    def forward(ctx, x, group, size, dim):
        ctx.args = group, size, dim
        return all_gather_along(x, group, size, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, *ctx.args), None, None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: partial sums over the whole SP shard -> this rank's piece of their sum. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group, size, dim):
        ctx.args = group, size, dim
        return reduce_scatter_along(x, group, size, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, *ctx.args), None, None, None


class _EnterReplicated(torch.autograd.Function):
    """Plain TP: forward identity; backward all-reduce (each TP rank's block used the same input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_copy(grad, ctx.group), None


class _LeaveReplicated(torch.autograd.Function):
    """Plain TP: forward all-reduce of the partial sums; backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class PieceDropout(torch.nn.Module):
    """Dropout of a row-parallel input (this rank's 1/size of the features): the mask of all features is drawn from
    the generator every TP rank shares, and this rank keeps its slice."""

    def __init__(self, p: float, rank: int, size: int):
        super().__init__()
        self.p, self.rank, self.size = p, rank, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        width = x.shape[-1]
        keep = torch.empty((*x.shape[:-1], width * self.size), device=x.device, dtype=x.dtype)
        keep = keep.bernoulli_(1 - self.p).narrow(-1, self.rank * width, width)
        return x * keep / (1 - self.p)


def tp_plan(model: torch.nn.Module) -> dict[str, str]:
    """The model's own tensor-parallel plan (transformers' `base_model_tp_plan`), else hf_seqpar's `OWN_PLAN`."""
    text_config = model.config.get_text_config()
    return dict(getattr(text_config, "base_model_tp_plan", None) or OWN_PLAN)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module the plan's names are relative to (LlamaModel inside LlamaForCausalLM)."""
    inner = getattr(model, model.base_model_prefix, None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _planned_linears(decoder: torch.nn.Module, plan: dict[str, str], name: str) -> dict[str, str]:
    styles = {}
    for path, module in decoder.named_modules():
        matches = {style for pattern, style in plan.items() if fnmatch.fnmatchcase(path, pattern)}
        if not matches:
            continue
        style = matches.pop()
        if style in _REPLICATED_STYLES:
            continue
        if style not in SHARD_DIM:
            raise NotImplementedError(
                f"hf_seqpar: {name}'s tp plan gives {path} the style {style!r}; tensor parallelism under hf_seqpar "
                f"supports {sorted(SHARD_DIM)} linears (and replicated modules); use tp_size=1 for this model"
            )
        linear = module.base_layer if hasattr(module, "base_layer") else module
        if not isinstance(linear, torch.nn.Linear):
            raise NotImplementedError(
                f"hf_seqpar: {name}'s tp plan splits {path}, a {type(linear).__name__}; only nn.Linear (and PEFT "
                "LoRA around one) can be split; use tp_size=1"
            )
        styles[path] = style
    if not styles:
        raise NotImplementedError(f"hf_seqpar: {name}'s tp plan {plan} matches no linear layer; use tp_size=1")
    return styles


def _check_model(model: torch.nn.Module, name: str) -> None:
    text_config = model.config.get_text_config()
    if any(getattr(text_config, f, None) for f in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise NotImplementedError(
            f"hf_seqpar: {name} is a mixture of experts; hf_seqpar's tensor parallelism splits dense blocks only; "
            "use tp_size=1 (sequence parallelism alone supports it)"
        )
    dropouts = {f: getattr(text_config, f) for f in _DROPOUT_FIELDS if getattr(text_config, f, None)}
    if dropouts:
        raise NotImplementedError(
            f"hf_seqpar: {name} applies dropout {dropouts} between blocks, where tensor-parallel ranks hold different "
            "tokens from one generator; set it to 0 or use tp_size=1"
        )


def _split(param: torch.nn.Parameter, dim: int, rank: int, size: int, what: str) -> None:
    if param.shape[dim] % size:
        raise ValueError(
            f"hf_seqpar: tp_size={size} must divide {what}'s {param.shape[dim]} features (weight "
            f"{tuple(param.shape)}, split along dim {dim}); use a tp_size dividing it"
        )
    # In place: the Parameter object stays the one an optimizer built before the split (accelerate loops build it
    # before prepare) holds; only its data becomes this rank's piece.
    param.data = param.detach().chunk(size, dim)[rank].clone()


def _shard_linear(path: str, module: torch.nn.Module, style: str, state: TensorParallelState) -> dict[str, int]:
    """Split one planned linear (and its LoRA factors) in place; returns {parameter path: split dim}."""
    rank, size = state.groups.tp_rank, state.size
    dim = SHARD_DIM[style]
    linear = module.base_layer if hasattr(module, "base_layer") else module
    if hasattr(linear.weight, "quant_state") or type(linear).__name__.endswith(("4bit", "8bitLt")):
        raise NotImplementedError(
            f"hf_seqpar: {path} is a quantized {type(linear).__name__} (QLoRA / bitsandbytes), whose packed weights "
            "tp_size > 1 cannot split; load the model in bf16, or use tp_size=1"
        )
    if style == "rowwise" and any(f.bias is not None for f in getattr(module, "lora_B", {}).values()):
        raise NotImplementedError(
            f"hf_seqpar: {path} has a LoRA bias (lora_bias=True) on a row-parallel layer, which every TP rank would "
            "add once; use lora_bias=False or tp_size=1"
        )
    split = {}
    _split(linear.weight, dim, rank, size, path)
    prefix = f"{path}.base_layer" if linear is not module else path
    split[f"{prefix}.weight"] = dim
    if linear.bias is not None:
        if style == "colwise":
            _split(linear.bias, 0, rank, size, path)
            split[f"{prefix}.bias"] = 0
        else:  # added once: every rank adds bias / size to the partial sums the reduce-scatter adds up
            state.hooks.append(linear.register_forward_hook(lambda m, a, out: out - m.bias * (1 - 1 / size)))
    linear.out_features, linear.in_features = linear.weight.shape
    if hasattr(module, "lora_A"):
        if getattr(module, "lora_magnitude_vector", None):
            raise NotImplementedError(f"hf_seqpar: {path} uses DoRA, which tp_size > 1 does not split; use LoRA")
        factors = module.lora_B if style == "colwise" else module.lora_A
        for adapter, factor in factors.items():
            _split(factor.weight, dim, rank, size, f"{path} LoRA")
            factor.out_features, factor.in_features = factor.weight.shape
            kind = "lora_B" if style == "colwise" else "lora_A"
            split[f"{path}.{kind}.{adapter}.weight"] = dim
            if factor.bias is not None and style == "colwise":
                _split(factor.bias, 0, rank, size, f"{path} LoRA bias")
                split[f"{path}.{kind}.{adapter}.bias"] = 0
        if style == "rowwise":
            for adapter, drop in list(module.lora_dropout.items()):
                if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                    module.lora_dropout[adapter] = PieceDropout(drop.p, rank, size)
        module.in_features, module.out_features = linear.in_features, linear.out_features
    return split


def _first_tensor_arg(args: tuple, kwargs: dict) -> tuple[tuple, dict, torch.Tensor]:
    if args:
        return args, kwargs, args[0]
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, kwargs, kwargs[key]


def _replace_first(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: value}


def _install_regions(model, decoder, blocks: set[str], state: TensorParallelState, sharded) -> None:
    group, size = state.groups.tp_group, state.size

    def enter(module, args, kwargs):
        args, kwargs, x = _first_tensor_arg(args, kwargs)
        x = _GatherSequence.apply(x, group, size, 1) if sharded() else _EnterReplicated.apply(x, group)
        return _replace_first(args, kwargs, x)

    def leave(module, args, out):
        first = out[0] if isinstance(out, tuple) else out
        first = (
            _ReduceScatterSequence.apply(first, group, size, 1) if sharded() else _LeaveReplicated.apply(first, group)
        )
        return (first, *out[1:]) if isinstance(out, tuple) else first

    def embed(module, args, out):
        return tp_piece(out, state.groups) if sharded() else out

    for path in sorted(blocks):
        block = decoder.get_submodule(path)
        state.hooks.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        state.hooks.append(block.register_forward_hook(leave))
    state.hooks.append(model.get_input_embeddings().register_forward_hook(embed))


def apply_tensor_parallel(model: torch.nn.Module, base: torch.nn.Module, groups: SeqParGroups, sharded) -> None:
    """Split `base` (a PreTrainedModel; `model` is what the user holds, a PeftModel too) over the TP group, in
    place. `sharded()` says whether the forward in progress is a sharded batch's. Idempotent for one TP group."""
    name = type(base).__name__
    existing: TensorParallelState | None = base.__dict__.get(TP_ATTR)
    if existing is not None:
        if existing.groups.tp_size != groups.tp_size or existing.groups.tp_rank != groups.tp_rank:
            raise ValueError(
                f"hf_seqpar: {name} is already split over tp_size={existing.groups.tp_size}; its weights cannot "
                f"be split again for tp_size={groups.tp_size}: load the model again"
            )
        return
    _check_model(base, name)
    plan = tp_plan(base)
    decoder = _decoder(base)
    linears = _planned_linears(decoder, plan, name)
    blocks = {path.rpartition(".")[0] for path, style in linears.items() if style == "rowwise"}
    orphans = sorted(p for p in linears if p.rpartition(".")[0] not in blocks)
    if orphans:
        raise NotImplementedError(
            f"hf_seqpar: {name}'s tp plan splits {orphans[:3]} outside any block that ends in a row-parallel linear; "
            "use tp_size=1"
        )
    state = TensorParallelState(groups, plan)
    prefix = "" if decoder is base else f"{base.base_model_prefix}."
    for path, style in linears.items():
        for param, dim in _shard_linear(path, decoder.get_submodule(path), style, state).items():
            state.sharded[prefix + param] = dim
    _install_regions(base, decoder, blocks, state, sharded)
    named = dict(base.named_parameters())
    state.params = {id(named[n]): named[n] for n in state.sharded}
    state.dims = {id(named[n]): dim for n, dim in state.sharded.items()}
    owners = {id(m): m for n in state.sharded for m in [base.get_submodule(n.rpartition(".")[0])]}
    for owner in owners.values():
        state.hooks.append(owner.register_load_state_dict_pre_hook(load_piece_hook(state)))
    keep_out_of_ddp(model, base, state)
    for owner in {id(model): model, id(base): base}.values():
        row = "PeftModel.save_pretrained (TP)" if owner is not base else "PreTrainedModel.save_pretrained (TP)"
        patch_instance(owner, {row: [whole_saves_only]})
    base.__dict__[TP_ATTR] = state
    logger.info("hf_seqpar: %s split over tp_size=%d (%d linears)", name, groups.tp_size, len(linears))


def tp_state(base: torch.nn.Module) -> TensorParallelState | None:
    return base.__dict__.get(TP_ATTR)
