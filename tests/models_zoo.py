"""Tiny causal LMs built from configs (nothing downloaded), one per family the integration must cover."""

from __future__ import annotations

import torch
import transformers

VOCAB, SEQ_WINDOW = 96, 8
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    attention_dropout=0.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": SEQ_WINDOW}),
    "qwen2": (
        "Qwen2Config",
        {
            "use_sliding_window": True,
            "sliding_window": SEQ_WINDOW,
            "max_window_layers": 1,
            "layer_types": ["full_attention", "sliding_attention"],
        },
    ),
    "qwen3": ("Qwen3Config", {}),
    "gemma2": (
        "Gemma2Config",
        {
            "sliding_window": SEQ_WINDOW,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 5.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "sliding_window": SEQ_WINDOW,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", {"sliding_window": SEQ_WINDOW}),
    "olmo2": ("Olmo2Config", {}),
    "gpt_oss": (
        "GptOssConfig",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": SEQ_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "deepseek_v3": (  # MLA: query/key head_dim 24 (16 + 8 rope), value head_dim 16
        "DeepseekV3Config",
        {
            "num_key_value_heads": 4,
            "head_dim": 8,  # the rotary part
            "kv_lora_rank": 16,
            "q_lora_rank": 24,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "moe_intermediate_size": 32,
        },
    ),
    "llama4": (  # chunked attention (block-diagonal causal, chunk 8) on RoPE layers, a NoPE full layer
        "Llama4TextConfig",
        {
            "attention_chunk_size": SEQ_WINDOW,
            "attn_temperature_tuning": False,
            "no_rope_layers": [1, 0],
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "intermediate_size_mlp": 96,
        },
    ),
}


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "eager", **overrides):
    """The family's tiny model, float32, train mode; `overrides` replace config fields (longer windows, positions)."""
    config_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if family == "gpt_oss":  # sinks start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()
    return model.float().train()
