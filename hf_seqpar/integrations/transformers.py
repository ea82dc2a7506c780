"""Sequence-parallel attention inside Hugging Face models, through transformers' public AttentionInterface.

`apply_sequence_parallel` registers `hf_seqpar_<mode>` (no mask builder, so transformers builds no S x S mask),
attaches the config and groups to every attention module (no globals), and switches the model to that name.
The attention function honours every argument the model passes or refuses it; it never drops one.

A forward whose batch did not come from SequenceShardingCollator (generate, a prompt evaluated on one rank) runs
with the model's original attention: forward hooks on the model switch it back for that call, masks included.
`remove_sequence_parallel` switches a model back for good.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..algorithms import sequence_parallel_attention
from ..config import SeqParConfig
from ..kernels import DocumentOffsets
from ..mesh import SeqParGroups
from .loss import LossCountCheck
from .memory import STATE_ATTR as MEMORY_ATTR
from .memory import apply_memory_savings
from .moe import SHARDED_FORWARD, install_router_loss
from .patches import PATCHES, read, set_attr
from .rng import ShardedRng
from .tensor_parallel import apply_tensor_parallel

logger = logging.getLogger("hf_seqpar")
STATE_ATTR = "_hf_seqpar"
DOCS_KEY = "seqpar_cu_seqlens"
REAL_TOKENS_KEY = "seqpar_real_tokens"  # [B, S_local] bool: this rank's tokens that are not padding
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
NEUTRAL_LAYER_TYPES = {"mlp", "moe", "dense", "sparse"}  # token-wise layers some configs list beside attention
# Attention kwargs that change nothing here: positions are already in q/k (RoPE), loss and output switches are
# for other modules, and our own batch keys are read from their own names.
_INERT_KWARGS = {
    "position_ids",
    "cache_position",
    "use_cache",
    "num_items_in_batch",
    "shift_labels",
    "return_dict",
    "output_hidden_states",
    "output_router_logits",
    "token_type_ids",
    "labels",
    DOCS_KEY,
    REAL_TOKENS_KEY,
}
# Describe the full, unsharded sequence to other attention paths; on a shard they would mislead.
_UNSHARDED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_IMPL = "PretrainedConfig._attn_implementation_internal"  # the private field switched per forward (PATCHES)
_ABSENT = object()  # sliding_window not passed at all (the model's mask alone would apply the config's window)
HONOURED_KWARGS = ("scaling", "is_causal", "sliding_window", "softcap", "s_aux", "dropout (must be 0)")


@dataclass
class SeqParState:
    """What one model's attention modules need: the config, the groups, the attention implementation each
    switched config had before, and a one-entry cache of the current batch's document offsets (moved to the host
    once per step, not once per layer)."""

    config: SeqParConfig
    groups: SeqParGroups
    impl: str
    originals: list  # [(config object, its original _attn_implementation)]
    hooks: list = field(default_factory=list)
    current_docs: torch.Tensor | None = None  # offsets of the latest sharded forward (None after an unsharded one)
    _docs_cache: list = field(default_factory=lambda: [None, None, None])
    _stack: list = field(default_factory=list)
    rng: ShardedRng = field(init=False)  # forks the generators per SP rank in sharded training forwards (rng.py)
    loss_count: LossCountCheck = field(init=False)  # does the loss take num_items_in_batch? (first sharded forward)
    attention: SeqParConfig = field(init=False)  # what the attention of one TP rank's heads runs (tp_size=1)

    def __post_init__(self):
        self.rng = ShardedRng(self.groups.sp_rank, self.groups.sp_size)
        self.loss_count = LossCountCheck()
        self.attention = dataclasses.replace(self.config, tp_size=1)

    def documents(self, offsets: torch.Tensor, chunk: int | None = None):
        """Document offsets per row as tuples (None for one document per row); with `chunk`, every document is
        also cut every `chunk` tokens (Llama-4 chunked attention: block-diagonal causal blocks)."""
        if self._docs_cache[0] is not offsets or self._docs_cache[1] != chunk:
            rows = []
            # DocumentOffsets live on the host: reading them costs no device sync (a tensor moved to the GPU does)
            for row in offsets.rows if isinstance(offsets, DocumentOffsets) else offsets.tolist():
                row = list(row)
                while len(row) > 2 and row[-1] == row[-2]:  # right padding by repetition
                    row.pop()
                if chunk:  # chunks count from each document's start, as when the document runs alone
                    row = sorted(
                        {p for a, b in zip(row, row[1:], strict=False) for p in range(a, b, chunk)} | {row[-1]}
                    )
                rows.append(tuple(row))
            single_doc = all(len(r) == 2 for r in rows)
            self._docs_cache[:] = [offsets, chunk, None if single_doc else tuple(rows)]
        return self._docs_cache[2]

    def enter(self, model: torch.nn.Module, kwargs: dict) -> None:
        """Forward pre-hook: a sharded batch uses our attention, any other the original (masks built for it); a
        sharded training forward draws its dropout masks from this SP rank's own stream; a sharded forward given
        labels and num_items_in_batch has its loss watched until one passes (loss.LossCountCheck)."""
        sharded = kwargs.get(DOCS_KEY) is not None
        self.rng.enter(sharded and model.training)
        self.current_docs = kwargs.get(DOCS_KEY)
        self._stack.append(([read(c, _IMPL) for c, _ in self.originals], SHARDED_FORWARD.get()))
        for cfg, original in self.originals:
            set_attr(cfg, _IMPL, self.impl if sharded else original)
        SHARDED_FORWARD.set((self, kwargs.get(REAL_TOKENS_KEY)) if sharded else None)
        if sharded:
            self.loss_count.enter(model, kwargs, len(self._stack))

    def leave(self, model: torch.nn.Module, output) -> None:
        """Forward hook (also when the forward raised: `output` None): undo what `enter` switched, then the loss
        check's verdict, which may refuse the model."""
        depth = len(self._stack)
        self.rng.leave()
        impls, current = self._stack.pop()
        for (cfg, _), impl in zip(self.originals, impls, strict=True):
            set_attr(cfg, _IMPL, impl)
        SHARDED_FORWARD.set(current)
        savings = getattr(model, MEMORY_ATTR, None)  # chunked_loss computes the loss itself, without loss_function
        self.loss_count.leave(model, output, depth, own_loss=savings is not None and savings.config.chunked_loss)


def _original_attention(module: torch.nn.Module, state: SeqParState):
    """The attention function `module` used before the switch (for forwards of unsharded batches)."""
    impl = next((orig for cfg, orig in state.originals if cfg is getattr(module, "config", None)), None)
    impl = impl or state.originals[0][1]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if impl in (None, "eager"):
        if eager is None:
            raise NotImplementedError(f"hf_seqpar: {type(module).__name__} has no eager attention to fall back to")
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


def _builds_sliding_masks(modeling_module: str) -> bool:
    """Does this modeling module ever build a sliding-window mask? (Moshi keeps a sliding_window it never uses.)
    Its families build one only through masking_utils' builder, which each imports into its namespace
    (tests/test_patches.py checks that this matches every modeling module of the pinned transformers)."""
    return callable(getattr(sys.modules[modeling_module], "create_sliding_window_causal_mask", None))


def _config_window(module: torch.nn.Module) -> int | None:
    """The sliding window the model's own mask would apply to this module's layer (for modules that do not pass
    `sliding_window` to the attention function: their plain run gets the window from the mask alone)."""
    config, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or not _builds_sliding_masks(type(module).__module__):
        return None
    if layer_types and layer is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window if getattr(config, "use_sliding_window", True) else None


def _layer_chunk(module: torch.nn.Module) -> int | None:
    """attention_chunk_size when this module's layer is a chunked-attention layer (Llama-4), else None."""
    config, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer is not None and layer_types[layer] == "chunked_attention":
        return config.attention_chunk_size
    return None


def _refusal(name: str, kwargs: dict, dropout: float, attention_mask, query, key) -> str | None:
    if dropout:
        return (
            f"{name}: attention dropout={dropout} cannot be reproduced exactly across ranks; set the model's "
            "attention_dropout to 0 (most causal LMs use 0)"
        )
    if attention_mask is not None:
        return (
            f"{name} received an explicit attention mask {tuple(attention_mask.shape)}; under sequence parallelism "
            "document and padding structure come from SequenceShardingCollator's seqpar_cu_seqlens instead"
        )
    if query.shape[2] != key.shape[2]:
        return (
            f"{name}: {query.shape[2]} query tokens against {key.shape[2]} keys: a KV cache holds earlier tokens, "
            "which a sharded forward cannot use; pass use_cache=False"
        )
    if kwargs.get("output_attentions"):
        return f"{name}: output_attentions=True needs the full S x S attention weights; sharded attention has none"
    unsharded = [k for k in _UNSHARDED_KWARGS if kwargs.get(k) is not None]
    if unsharded:
        return f"{name}: {unsharded} describe the unsharded sequence; drop them (SequenceShardingCollator does)"
    known = _INERT_KWARGS.union(_UNSHARDED_KWARGS, ["output_attentions"])
    unknown = sorted(k for k, v in kwargs.items() if k not in known and v is not None)  # None: the feature is off
    if unknown:
        return (
            f"{name} passed attention arguments {unknown} that hf_seqpar does not know, so it cannot promise the "
            f"same result; it honours {list(HONOURED_KWARGS)}. Please report the model family"
        )
    return None


def seqpar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None | object = _ABSENT,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: q [B, H, S_local, D], k/v [B, H_kv, S_local, D] -> ([B, S_local, H, D], None).

    A call without the collator's document offsets (an unsharded batch reaching a module directly, or the
    recompute of such a forward under gradient checkpointing) is passed to the original attention unchanged."""
    state: SeqParState | None = getattr(module, STATE_ATTR, None)
    name = type(module).__name__
    if state is None:
        raise RuntimeError(f"hf_seqpar: {name} was switched to hf_seqpar attention without apply_sequence_parallel")
    # Families whose layers do not pass **kwargs down get the offsets from the sharded forward in progress (or,
    # in the recompute of gradient checkpointing, from the latest one).
    offsets = kwargs.get(DOCS_KEY, state.current_docs)
    if sliding_window is _ABSENT:
        sliding_window = None if offsets is None else _config_window(module)
    if offsets is None:
        honoured = dict(dropout=dropout, scaling=scaling, sliding_window=sliding_window, softcap=softcap)
        honoured.update(is_causal=is_causal, s_aux=s_aux)
        honoured = {k: v for k, v in honoured.items() if v is not None}
        return _original_attention(module, state)(module, query, key, value, attention_mask, **honoured, **kwargs)
    refusal = _refusal(name, kwargs, dropout, attention_mask, query, key)
    if refusal:
        raise NotImplementedError("hf_seqpar: " + refusal)
    causal = module.is_causal if is_causal is None else is_causal
    out = sequence_parallel_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        config=state.attention,
        groups=state.groups,
        causal=causal,
        scale=scaling,
        cu_seqlens=state.documents(offsets, _layer_chunk(module)),
        window=sliding_window,
        softcap=softcap,
        sinks=s_aux,
    )
    return out, None


def _base_model(model: torch.nn.Module) -> PreTrainedModel:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the plain-model path independent of it
        PeftModel = ()  # noqa: N806
    if PeftModel and isinstance(model, PeftModel):
        if model.peft_config[model.active_adapter].is_prompt_learning:
            raise NotImplementedError(
                f"hf_seqpar: PEFT {model.peft_config[model.active_adapter].peft_type} prepends virtual tokens, which "
                "cannot be split by sequence; use LoRA (or another non-prompt-learning method)"
            )
        return model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"hf_seqpar: apply_sequence_parallel needs a transformers PreTrainedModel or PeftModel; got {type(model)}"
        )
    return model


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_supported(model: PreTrainedModel, config: SeqParConfig) -> tuple[list[torch.nn.Module], SeqParConfig]:
    name = type(model).__name__
    text_config = _text_config(model.config)
    other_layers = sorted(
        set(getattr(text_config, "layer_types", None) or ()) - SUPPORTED_LAYER_TYPES - NEUTRAL_LAYER_TYPES
    )
    indexed = [t for t in other_layers if "index" in t] + (["indexer"] if _has_indexer(model) else [])
    if indexed:
        raise NotImplementedError(
            f"hf_seqpar: {name} has sparse indexed attention ({indexed}): a learned indexer picks each query's keys "
            "from the whole sequence, which no rank holds; train it without sequence parallelism"
        )
    if other_layers:
        raise NotImplementedError(
            f"hf_seqpar: {name} has layers of type {other_layers}: recurrent / linear-attention / convolution layers "
            "carry state along the sequence and cannot be split across ranks; use a model without them"
        )
    _check_forward(model)
    if getattr(text_config, "attn_temperature_tuning", False) and not all(
        getattr(text_config, "no_rope_layers", None) or [1]
    ):
        raise NotImplementedError(
            f"hf_seqpar: {name} scales NoPE-layer queries by token index (attn_temperature_tuning, floor_scale="
            f"{getattr(text_config, 'floor_scale', None)}), which each rank would count from its own shard; set "
            "attn_temperature_tuning=False in the config to fine-tune under sequence parallelism"
        )
    crossing = sorted({type(m).__name__ for m in model.modules() if "CrossAttention" in type(m).__name__})
    if crossing:
        raise NotImplementedError(
            f"hf_seqpar: {name} has cross-attention ({crossing}) between the sequence and another one it builds "
            "itself (patches, encoder states) with its own mask; only self-attention can be sharded"
        )
    if any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules()):
        raise NotImplementedError(
            f"hf_seqpar: {name} numbers positions from padding_idx + 1 and counts them from input_ids (RoBERTa-style "
            "embeddings), not from the 0-based position_ids that sequence sharding needs; this family is not supported"
        )
    if not read(model, "PreTrainedModel._can_set_attn_implementation")():
        raise NotImplementedError(
            f"hf_seqpar: {name} does not route attention through transformers' AttentionInterface, so its "
            "attention cannot be replaced; use a model family that does (Llama, Mistral, Qwen, Gemma, Phi3, OLMo, ...)"
        )
    modules = [m for m in model.modules() if hasattr(m, "is_causal") and not isinstance(m, PreTrainedModel)]
    if not modules:
        named = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise NotImplementedError(
            f"hf_seqpar: {name}: its attention modules {named or ''} do not declare `is_causal`, so hf_seqpar cannot "
            "tell which mask they compute; this family is not supported"
        )
    heads = getattr(text_config, "num_attention_heads", None)
    if heads is None:
        return modules, config
    return modules, config.resolve(heads, getattr(text_config, "num_key_value_heads", None) or heads)


def _has_indexer(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "indexer") and hasattr(m, "is_causal") for m in model.modules())


def _check_forward(model: PreTrainedModel) -> None:
    """The causal LM's forward must take the loss count and global positions: without `num_items_in_batch` (or
    **kwargs to carry it) each rank averages its own shard; without `position_ids` each rank numbers its shard
    from 0 (decoders of encoder-decoder models used alone take neither). Whether its loss then divides by the count
    is seen at the first sharded forward (loss.LossCountCheck)."""
    params = inspect.signature(type(model).forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [n for n in ("num_items_in_batch", "position_ids") if n not in params]
    if missing:
        raise NotImplementedError(
            f"hf_seqpar: {type(model).__name__}.forward takes no {missing}: its loss would be each rank's own mean "
            "and its positions would restart on every shard; this family is not supported"
        )


def _not_ours(impl: str | None) -> str | None:
    return "sdpa" if isinstance(impl, str) and impl.startswith("hf_seqpar_") else impl


def _configs(model: torch.nn.Module) -> list:
    """Every distinct config object the model's modules read their attention implementation from."""
    seen = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, PATCHES[_IMPL].attr):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def apply_sequence_parallel(model: torch.nn.Module, *, config: SeqParConfig, groups: SeqParGroups):
    """Switch `model` (in place; a PeftModel too) to sequence-parallel attention and return it.

    Batches from SequenceShardingCollator then run sharded; any other forward (generate, a plain prompt) runs the
    model's original attention. `remove_sequence_parallel(model)` undoes the switch. The config's memory savings
    (chunked_loss, tiled_mlp, offload_checkpoints) are switched to exactly what it asks for, as by
    `apply_memory_savings(model, config)`: a second call with another config replaces the first's, savings too."""
    base = _base_model(model)
    if (config.sp_size, config.tp_size) != (groups.sp_size, groups.tp_size):
        raise ValueError(
            f"hf_seqpar: config has sp_size={config.sp_size}, tp_size={config.tp_size} but the groups have "
            f"sp_size={groups.sp_size}, tp_size={groups.tp_size}; build them with init_groups(config)"
        )
    modules, resolved = _check_supported(base, config)  # head constraints fail here, before any step
    savings = getattr(base, MEMORY_ATTR, None)  # the same savings already on (custom chunk sizes too) stay as they are
    if savings is None or savings.config.memory_savings != config.memory_savings:
        apply_memory_savings(model, config)  # refuses (model untouched) what a saving cannot reproduce exactly
    remove_sequence_parallel(model)  # a second apply replaces the first
    impl = f"hf_seqpar_{config.mode}"
    AttentionInterface.register(impl, seqpar_attention_forward)
    # A model loaded with our name already (TRL builds reference models from the policy's config) falls back to SDPA.
    before = {id(c): _not_ours(read(c, _IMPL)) for c in _configs(base)}
    base.set_attn_implementation(impl)
    if read(_text_config(base.config), "PretrainedConfig._attn_implementation") != impl:
        raise NotImplementedError(f"hf_seqpar: {type(base).__name__} refused attn_implementation={impl!r}")
    originals = [(c, before[id(c)]) for c in _configs(base) if read(c, _IMPL) == impl]
    state = SeqParState(config=resolved, groups=groups, impl=impl, originals=originals)
    install_router_loss(base, groups)
    for module in modules:
        setattr(module, STATE_ATTR, state)
    for module in base.modules():  # the outer model and its inner decoder: nested calls are stacked
        if isinstance(module, PreTrainedModel):
            pre = module.register_forward_pre_hook(lambda m, a, kw: state.enter(m, kw), with_kwargs=True)
            post = module.register_forward_hook(lambda m, a, out: state.leave(m, out), always_call=True)
            state.hooks += [pre, post]
    setattr(base, STATE_ATTR, state)
    if config.tp_size > 1:  # weights split once; the split stays when SP is removed (plain TP then)
        apply_tensor_parallel(model, base, groups, lambda: _sharded_forward(base))
    picked = f" (mode='auto' picked {resolved.describe()})" if config.mode == "auto" else ""
    logger.info("hf_seqpar: %s attention switched to %s%s", type(base).__name__, impl, picked)
    return model


def _sharded_forward(base: PreTrainedModel) -> bool:
    """Is the forward in progress (or the gradient-checkpointing recompute of the latest one) a sharded batch's?"""
    state = base.__dict__.get(STATE_ATTR)
    return state is not None and state.current_docs is not None


def remove_sequence_parallel(model: torch.nn.Module):
    """Switch `model` (a PeftModel too) back to the attention it had before `apply_sequence_parallel`; in place,
    returns it. A model that was never switched is returned unchanged."""
    base = _base_model(model)
    state: SeqParState | None = base.__dict__.get(STATE_ATTR)
    if state is None:
        return model
    for handle in state.hooks:
        handle.remove()
    for module in base.modules():
        module.__dict__.pop(STATE_ATTR, None)
    for cfg, original in state.originals:
        set_attr(cfg, _IMPL, original)
    return model
