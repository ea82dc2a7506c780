"""Sequence-parallel attention inside Hugging Face models, through transformers' public AttentionInterface.

`apply_sequence_parallel` registers `hf_seqpar_<mode>` (no mask builder, so transformers builds no S x S mask),
attaches the config and groups to every attention module (no globals), and switches the model to that name.
The attention function honours every argument the model passes or refuses it; it never drops one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel

from ..algorithms import sequence_parallel_attention
from ..config import SeqParConfig
from ..mesh import SeqParGroups

logger = logging.getLogger("hf_seqpar")
STATE_ATTR = "_hf_seqpar"
DOCS_KEY = "seqpar_cu_seqlens"
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}
# Keys that describe the full, unsharded sequence to other attention paths; on a shard they would mislead.
_REFUSED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass
class SeqParState:
    """What one model's attention modules need: the config, the groups, and a one-entry cache of the current
    batch's document offsets (moved to the host once per step, not once per layer)."""

    config: SeqParConfig
    groups: SeqParGroups
    _docs_cache: list = field(default_factory=lambda: [None, None])

    def documents(self, offsets: torch.Tensor):
        if self._docs_cache[0] is not offsets:
            rows = []
            for row in offsets.tolist():
                while len(row) > 2 and row[-1] == row[-2]:  # right padding by repetition
                    row.pop()
                rows.append(tuple(row))
            single_doc = all(len(r) == 2 for r in rows)
            self._docs_cache[:] = [offsets, None if single_doc else tuple(rows)]
        return self._docs_cache[1]


def seqpar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: q [B, H, S_local, D], k/v [B, H_kv, S_local, D] -> ([B, S_local, H, D], None)."""
    state: SeqParState | None = getattr(module, STATE_ATTR, None)
    name = type(module).__name__
    if state is None:
        raise RuntimeError(f"{name} was switched to hf_seqpar attention without apply_sequence_parallel(model, ...)")
    if dropout:
        raise NotImplementedError(
            f"{name}: attention dropout={dropout} cannot be reproduced exactly across ranks; set the model's "
            "attention_dropout to 0 (most causal LMs use 0)"
        )
    if attention_mask is not None:
        raise NotImplementedError(
            f"{name} received an explicit attention mask {tuple(attention_mask.shape)}; under sequence parallelism "
            "document and padding structure come from SequenceShardingCollator's seqpar_cu_seqlens instead"
        )
    refused = [k for k in _REFUSED_KWARGS if kwargs.get(k) is not None]
    if refused:
        raise NotImplementedError(f"{name}: {refused} describe the unsharded sequence; drop them (the collator does)")
    offsets = kwargs.get(DOCS_KEY)
    if offsets is None:
        raise ValueError(
            f"{name}: the batch has no '{DOCS_KEY}'. Sharded batches must come from "
            "hf_seqpar.SequenceShardingCollator, which also carries the document and padding boundaries"
        )
    causal = module.is_causal if is_causal is None else is_causal
    out = sequence_parallel_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        config=state.config,
        groups=state.groups,
        causal=causal,
        scale=scaling,
        cu_seqlens=state.documents(offsets),
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
                f"PEFT {model.peft_config[model.active_adapter].peft_type} prepends virtual tokens, which cannot be "
                "split by sequence; use LoRA (or another non-prompt-learning method)"
            )
        return model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"apply_sequence_parallel needs a transformers PreTrainedModel or PeftModel; got {type(model)}"
        )
    return model


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_supported(model: PreTrainedModel, config: SeqParConfig) -> tuple[list[torch.nn.Module], SeqParConfig]:
    name = type(model).__name__
    text_config = _text_config(model.config)
    other_layers = sorted(set(getattr(text_config, "layer_types", None) or ()) - SUPPORTED_LAYER_TYPES)
    if other_layers:
        raise NotImplementedError(
            f"{name} has layers of type {other_layers}: recurrent / linear-attention / convolution layers carry state "
            "along the sequence and cannot be split across ranks by hf_seqpar"
        )
    if not model._can_set_attn_implementation():
        raise NotImplementedError(
            f"{name} does not route attention through transformers' AttentionInterface, so hf_seqpar cannot "
            "replace its attention; use a model family that does (Llama, Mistral, Qwen, Gemma, Phi3, OLMo, ...)"
        )
    modules = [m for m in model.modules() if "Attention" in type(m).__name__ and hasattr(m, "is_causal")]
    if not modules:
        raise NotImplementedError(f"{name}: found no attention module with an `is_causal` attribute to switch")
    heads = getattr(text_config, "num_attention_heads", None)
    if heads is None:
        return modules, config
    return modules, config.resolve(heads, getattr(text_config, "num_key_value_heads", None) or heads)


def apply_sequence_parallel(model: torch.nn.Module, *, config: SeqParConfig, groups: SeqParGroups):
    """Switch `model` (in place; a PeftModel too) to sequence-parallel attention and return it."""
    base = _base_model(model)
    modules, resolved = _check_supported(base, config)  # head constraints fail here, before any step
    impl = f"hf_seqpar_{config.mode}"
    AttentionInterface.register(impl, seqpar_attention_forward)
    state = SeqParState(config=config, groups=groups)
    for module in modules:
        setattr(module, STATE_ATTR, state)
    base.set_attn_implementation(impl)
    if _text_config(base.config)._attn_implementation != impl:
        raise NotImplementedError(f"{type(base).__name__} refused attn_implementation={impl!r}")
    picked = f" (mode='auto' picked {resolved.describe()})" if config.mode == "auto" else ""
    logger.info("hf_seqpar: %s attention switched to %s%s", type(base).__name__, impl, picked)
    return model
