"""What the estimate reads: GPU kinds, preset model shapes (config.json fields), element sizes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOSS_CHUNK_BYTES = 32 << 20  # float32 logits per loss chunk (integrations/memory.py)
MLP_TILE_TOKENS = 256  # an MLP tile is max(this, hidden_size) tokens (integrations/memory.py)


@dataclass(frozen=True)
class GpuSpec:
    memory_gib: float
    bf16_tflops: float  # dense peak
    intra_gbs: float  # NVLink, per direction, per GPU
    inter_gbs: float  # InfiniBand / RoCE, per direction, per GPU


GPUS = {  # vendor sheets (../shared/reference/performance.md §5)
    "h100": GpuSpec(80, 989, 450, 50),
    "h200": GpuSpec(141, 989, 450, 50),
    "a100": GpuSpec(80, 312, 300, 25),
}

_LLAMA = {"model_type": "llama", "tie_word_embeddings": False}
PRESETS = {  # the shapes of common families (config.json fields)
    "llama3-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama3-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama3.2-1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": True},
    "mistral-7b": {**_LLAMA, "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768},
    "qwen2.5-7b": {**_LLAMA, "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064},
    "qwen2.5-72b": {**_LLAMA, "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                    "vocab_size": 152064},
    "qwen3-8b": {**_LLAMA, "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "vocab_size": 151936},
    "qwen3-30b-a3b": {**_LLAMA, "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "vocab_size": 151936},
    "gemma2-9b": {**_LLAMA, "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
                  "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                  "vocab_size": 256000, "tie_word_embeddings": True},
    "phi3-mini": {**_LLAMA, "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064},
}  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp_active: int  # intermediate width one token goes through (MoE: experts per token x expert width)
    params: int
    lora_params: int  # LoRA r=16 on q, k, v, o and the MLP projections (MoE: every expert)
    split_per_layer: int = 0  # parameters of the linears tp_size splits (q, k, v, o, gate, up, down) per layer
    lora_split_per_layer: int = 0  # their LoRA factors that split with them (B of q/k/v/gate/up, A of o/down)
    dense: bool = True  # False for mixtures of experts (tensor parallelism refuses them)

    @classmethod
    def from_config(cls, cfg: dict, lora_rank: int = 16) -> ModelShape:
        cfg = cfg.get("text_config", cfg)
        h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        d = cfg.get("head_dim") or h // heads
        vocab, inter = cfg["vocab_size"], cfg["intermediate_size"]
        experts, per_tok = cfg.get("num_experts") or cfg.get("num_local_experts"), cfg.get("num_experts_per_tok")
        if experts and per_tok:
            width = cfg.get("moe_intermediate_size") or inter
            mlp_params, active = experts * 3 * h * width + h * experts, per_tok * width
            lora_mlp = experts * 3 * lora_rank * (h + width)
        else:
            mlp_params, active, lora_mlp = 3 * h * inter, inter, 3 * lora_rank * (h + inter)
        attn = linears = h * heads * d * 2 + h * kv * d * 2
        if cfg.get("model_type") in ("qwen3", "qwen3_moe"):  # RMSNorm of each q and k head
            attn += 2 * d
        norms = 4 if cfg.get("model_type") in ("gemma2", "gemma3", "gemma3_text") else 2  # pre and post norms
        per_layer = attn + mlp_params + norms * h
        embed = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
        lora_attn = lora_rank * (2 * (h + heads * d) + 2 * (h + kv * d))
        return cls(
            layers, h, heads, kv, d, vocab, active, layers * per_layer + embed + h, layers * (lora_attn + lora_mlp),
            split_per_layer=linears + mlp_params, dense=not (experts and per_tok),
            lora_split_per_layer=lora_rank * (2 * heads * d + 2 * kv * d + 3 * inter),
        )  # fmt: skip


def load_model(spec: str) -> tuple[str, ModelShape]:
    """A preset name or a path to a config.json (or a directory holding one)."""
    if spec in PRESETS:
        return spec, ModelShape.from_config(PRESETS[spec])
    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"hf_seqpar: --model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    return str(path), ModelShape.from_config(json.loads(path.read_text()))
