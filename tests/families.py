"""A tiny instance of every config class in transformers' causal-LM auto mapping (nothing downloaded).

`tiny_config(family)` starts from the config class's defaults and shrinks, generically, whatever size
attributes the class has (hidden 64, 4 heads of 16, 2 KV heads, 2 layers, vocab 128, 4 experts top-2, small MLA
ranks, sliding window 8).  Per-layer lists (layer_types, no_rope_layers, ...) keep one layer of each distinct
kind in the family's order, so every mechanism a family has is still exercised.  `OVERRIDES` holds what
generic shrinking cannot know.  `SKIPPED` lists the entries that are not decoder-only causal LMs, each with
its reason; anything else that does not build is a builder bug, not a skip.
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, WINDOW = 64, 4, 2, 16, 2, 8

# Size attributes by every spelling the config classes use; set only where the class has the attribute.
_SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "dim", "embed_dim", "model_dim"), HIDDEN),
    **dict.fromkeys(
        (
            "intermediate_size",
            "ffn_dim",
            "n_inner",
            "ffn_hidden_size",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
            "d_ff",
            "dim_ff",
            "ffn_config_hidden",
        ),
        96,
    ),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers"), LAYERS
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "decoder_attention_heads",
            "encoder_attention_heads",
            "num_heads",
        ),
        HEADS,
    ),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), KV_HEADS),
    "head_dim": HEAD_DIM,
    "kv_channels": HEAD_DIM,
    "attention_head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"), 256),
    **dict.fromkeys(
        (
            "attention_dropout",
            "attn_pdrop",
            "attention_probs_dropout_prob",
            "dropout",
            "hidden_dropout",
            "hidden_dropout_prob",
            "resid_pdrop",
            "embd_pdrop",
            "activation_dropout",
            "attn_dropout",
            "resid_dropout",
            "embed_dropout",
            "ffn_dropout",
            "mlp_dropout",
            "emb_dropout",
            "classifier_dropout",
            "layerdrop",
            "decoder_layerdrop",
            "encoder_layerdrop",
            "attention_dropout_prob",
            "hidden_dropout_rate",
        ),
        0.0,
    ),
    "sliding_window": WINDOW,
    # MoE
    **dict.fromkeys(
        ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts", "n_experts"),
        4,
    ),
    **dict.fromkeys(
        ("num_experts_per_tok", "moe_topk", "top_k", "moe_top_k", "num_selected_experts", "moe_k", "router_topk"), 2
    ),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "expert_intermediate_size",
            "shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "intermediate_size_mlp",
        ),
        32,
    ),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    # MLA: q/k head 16 + 8, value head 16 (different on purpose: the value head dim must be honoured)
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 24,
    # state-space / recurrent widths (hybrids): small, consistent with hidden 64
    "state_size": 8,
    "mamba_d_state": 8,
    "ssm_state_size": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 32,
    "mamba_head_dim": 32,
    "mamba_n_groups": 1,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "attention_chunk_size": WINDOW,
    "rotary_dim": HEAD_DIM // 2,
    "embedding_dim": HIDDEN,
    "num_experts_per_token": 2,
    "num_expert_group": 1,
    "num_dense_layers": 1,
    "linear_num_heads": 4,
    "linear_head_dim": 16,
    "mamba_d_ssm": 128,
    "num_kv_shared_layers": 0,
    "vocab_size_per_layer_input": VOCAB,
    "adapter_in_dim": HIDDEN,  # vision / audio adapters that must match their tower's width
    "adapter_input_size": HIDDEN,
    "adapter_out_dim": HIDDEN,
    "hidden_size_global": HIDDEN,  # BLT: the global (patch) transformer's width
    "local_attention_window_len": WINDOW,
    "encoder_hash_byte_group_vocab": 256,
}
# Token ids must fall inside the tiny vocabulary.
_TOKEN_IDS = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    "sep_token_id": 2,
    "cls_token_id": 1,
    "mask_token_id": 3,
    "unk_token_id": 3,
}

# Entries that are not decoder-only causal LMs (with why).  Everything else must build and be swept.
_DRAFT = (
    "speculative-decoding draft model: forward needs the target model's inputs_embeds and shared_kv_states, "
    "it is not a standalone causal LM"
)
SKIPPED: dict[str, str] = {
    "gemma4_assistant": _DRAFT,
    "gemma4_unified_assistant": _DRAFT,
    "musicgen": "text-to-audio encoder-decoder; AutoModelForCausalLM.from_config(MusicgenConfig()) does not build "
    "(the causal head takes the decoder sub-config and predicts parallel audio codebooks)",
    "musicgen_melody": "text-to-audio encoder-decoder; AutoModelForCausalLM.from_config(MusicgenMelodyConfig()) does "
    "not build (the causal head takes the decoder sub-config and predicts parallel audio codebooks)",
    "git": "image-to-text model: its LM loss drops the first num_image_tokens positions (from vision_config), "
    "assuming image tokens precede the text; without pixel_values nothing is left",
    "gemma3n": "vision/audio wrapper whose vision tower needs the timm package (not a dependency here); its text "
    "decoder is swept as gemma3n_text",
}

# What generic shrinking cannot know, per family (applied last, to the top-level config).
OVERRIDES: dict[str, dict] = {
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "zaya": {"num_experts_per_tok": 1},
    "mamba2": {"head_dim": 32, "n_groups": 1},
    "falcon_h1": {"mamba_d_head": 32},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": KV_HEADS, "clip_qkv": 8.0}},
    "reformer": {
        "axial_pos_embds_dim": [32, 32],
        "axial_pos_shape": [4, 4],
        "local_attn_chunk_length": 8,
        "lsh_attn_chunk_length": 8,
        "attn_layers": ["local", "lsh"],
        "num_buckets": 4,
    },
    "blt": {"use_cache": False},  # transformers 5.23: BLT's cache setup reads a num_hidden_layers it lacks
    "xlstm": {
        "chunk_size": 8,
        "use_cache": False,
        "return_last_states": False,
        "num_blocks": LAYERS,
        "qk_dim_factor": 1.0,
    },
    "cohere_compass_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    "longcat_flash": {"zero_expert_num": 2, "expert_ffn_hidden_size": 32},
    "zamba": {"num_hidden_layers": 5, "attn_layer_period": 2, "attn_layer_offset": 1, "layers_block_type": None},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
    },
    # looped depth: one input, one recurrent (run twice), one output layer; to_dict() doubles the counts it shrinks
    "dory": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "n_input_layers": 1,
        "n_recurrent_layers": 1,
        "n_output_layers": 1,
    },
    # an indexer layer, then a re-indexer reading its K/V; a sliding layer; budgets small enough to select
    "kolibri1_1": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "indexed_attention", "indexed_attention"],
        "index_layers": [1],
        "kv_source_layers": [0, 1, 1],
        "mlp_only_layers": [0],
        "index_num_heads": 2,
        "index_topk": 4,
        "index_pool_size": 8,
        "index_compression": 2,
        "index_num_local_tokens": 2,
        "index_num_sink_tokens": 1,
    },
}
OVERRIDES["qwen4_exp"] = {"text_config": OVERRIDES["qwen4_exp_text"]}


def _shrink(defaults: transformers.PreTrainedConfig, extra: dict) -> dict:
    """Constructor kwargs for a tiny config of `defaults`' class, from that default instance."""
    values = defaults.to_dict()
    kwargs = {k: v for k, v in _SIZES.items() if k in values}
    for key, value in values.items():  # every dropout / router jitter off: the reference must be deterministic
        if isinstance(value, float) and value and any(w in key for w in ("drop", "jitter")):
            kwargs[key] = 0.0
    for key, value in kwargs.items():  # some classes type their dropouts as int
        if value == 0.0 and isinstance(values[key], int):
            kwargs[key] = 0
    if "qk_rope_head_dim" in values and values.get("head_dim") == values["qk_rope_head_dim"]:
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]  # MLA: head_dim names the rotary part
    if "kv_lora_rank" in values and "num_key_value_heads" in kwargs:
        kwargs["num_key_value_heads"] = HEADS  # MLA expands the latent to every head: no grouping
    if "is_decoder" in values:  # encoder classes with a causal-LM head: their decoder mode is the causal LM
        kwargs["is_decoder"] = True
    for key, value in _TOKEN_IDS.items():
        if key in values and values[key] is not None:
            kwargs[key] = value
    old_layers = next(
        (
            values[k]
            for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
            if isinstance(values.get(k), int)
        ),
        None,
    )
    if old_layers:
        keep = _layer_indices(values, old_layers)
        for key, value in values.items():
            if isinstance(value, list) and len(value) == old_layers and old_layers > 1:
                kwargs[key] = [value[i] for i in keep]
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
            if key in kwargs:
                kwargs[key] = len(keep)
    for key, sub in values.items():  # composite configs: shrink the sub-configs the same way
        sub_config = getattr(defaults, key, None) if isinstance(sub, dict) else None
        if isinstance(sub_config, transformers.PreTrainedConfig):
            kwargs[key] = _shrink(sub_config, extra.get(key, {}))
    kwargs.update({k: v for k, v in extra.items() if not isinstance(v, dict) or k not in kwargs})
    return kwargs


def _layer_indices(values: dict, old_layers: int) -> list[int]:
    """Layer indices that keep one layer of each distinct per-layer signature, in order (at least LAYERS)."""
    lists = [v for k, v in values.items() if isinstance(v, list) and len(v) == old_layers and old_layers > 1]
    signatures, keep = set(), []
    for i in range(old_layers):
        sig = repr([lst[i] for lst in lists])
        if sig not in signatures:
            signatures.add(sig)
            keep.append(i)
    for i in range(old_layers):
        if len(keep) >= LAYERS:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)[: max(LAYERS, min(len(keep), 4))]


# Extra rows: a family with a config switch that its default refuses, so the mechanism behind it is still swept.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama4_text+no_temperature_tuning": ("llama4_text", {"attn_temperature_tuning": False}),
}


def config_class(family: str):
    return getattr(transformers, CONFIG_MAPPING_NAMES[VARIANTS.get(family, (family,))[0]])


def tiny_config(family: str) -> transformers.PreTrainedConfig:
    base, extra = VARIANTS.get(family, (family, {}))
    cls = config_class(base)
    return cls(**_shrink(cls(), {**OVERRIDES.get(base, {}), **extra}))


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "eager"):
    """The tiny float32 model for `family`, in train mode, with deterministic weights."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():  # parameters that start at zero (sinks, some gates) would hide a dropped feature
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_()
    if hasattr(model, "set_default_language"):  # X-MOD: language adapters need a language
        model.set_default_language(config.languages[0])
    return model.float().train()


def causal_lm_families() -> list[str]:
    """Every entry of the causal-LM auto mapping, plus the variants."""
    return sorted([*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *VARIANTS])
