"""`hf-seqpar estimate`: memory per GPU, the split to use, and communication against compute, before renting GPUs.

Analytic, from the model's config.json (or a preset) and the run's shape. The memory terms follow what a Hugging Face
decoder stores during one training step (per local token and layer, from the modules' autograd saves: the residual
stream, two RMSNorm intermediates and output, q / k / v after RoPE, the attention output, the four MLP
intermediates); they are checked against benchmarks/memory.py's measurements (tests/test_estimate.py).
Communication uses the same per-layer formulas as benchmarks/comm_volume.py (attention) and
benchmarks/tp_comm_volume.py (tensor parallelism's all-gathers and reduce-scatters), which measure them on gloo.
`--tp-size` estimates TP x SP (SeqParConfig.tp_size); the report compares SP alone with every TP x SP layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from fractions import Fraction
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


# ---- communication (the formulas benchmarks/comm_volume.py checks on gloo) ----------------------------------------


def kv_heads_sent(heads: int, kv_heads: int, ulysses: int) -> int:
    """K/V heads per Ulysses group after replication (algorithms/ulysses.kv_heads_for_split)."""
    return kv_heads if kv_heads % ulysses == 0 else ulysses if ulysses % kv_heads == 0 else heads


def comm_bytes_per_layer(mode, world, ulysses, batch, local, heads, kv_heads, head_dim, elem, acc=4):
    """(forward, backward) bytes one rank sends for one attention call, split {"all_to_all": .., "ring": ..}."""
    u = {"ring": 1, "allgather": 1, "ulysses": world}.get(mode, ulysses)
    sent = kv_heads_sent(heads, kv_heads, u)
    a2a = Fraction(u - 1, u) * batch * local * head_dim * elem * (2 * heads + 2 * sent) if u > 1 else 0
    kv = 2 * batch * local * sent * head_dim  # elements of this rank's K/V shard (ring over world // u groups)
    r = world // u
    fwd, bwd = (r - 1) * kv * elem, (r - 1) * kv * (elem + acc)
    return {"all_to_all": int(a2a), "ring": int(fwd)}, {"all_to_all": int(a2a), "ring": int(bwd)}


def tp_comm_bytes_per_layer(tp, batch, sp_tokens, hidden, elem, reentrant=False):
    """(forward, backward, recompute) bytes one TP rank sends per decoder layer through the Megatron-SP regions
    (integrations/tensor_parallel.py): each of the two blocks (attention, MLP) all-gathers its input
    [batch, sp_tokens / tp, hidden] -> [batch, sp_tokens, hidden] and reduce-scatters its output back, (tp-1)/tp of
    the gathered tensor's bytes each (ring algorithm). Backward: the transposes, the same bytes. Recompute (gradient
    checkpointing): both all-gathers and the attention block's reduce-scatter, since the MLP block's output is saved
    by nothing and torch's non-reentrant recompute (transformers' default) stops once the saved tensors are back;
    a reentrant one reruns the whole layer, the MLP's reduce-scatter too."""
    each = Fraction(tp - 1, tp) * batch * sp_tokens * hidden * elem
    both = {"all_gather": int(2 * each), "reduce_scatter": int(2 * each)}
    return both, dict(both), {"all_gather": int(2 * each), "reduce_scatter": int((2 if reentrant else 1) * each)}


# ---- memory ---------------------------------------------------------------------------------------------------------


def _norm_bytes(h: int, e: int) -> int:
    """RMSNorm in float32: the upcast input (bf16 models), x * rsqrt, the output in the model dtype."""
    return (4 * h if e != 4 else 0) + 4 * h + e * h


def _layer_bytes(m: ModelShape, e: int, tp: int = 1) -> int:
    """Bytes one decoder layer keeps per token for the backward, without checkpointing. Under tensor parallelism,
    per token of this rank's piece: heads and MLP widths are split as the tokens are gathered (the same bytes), and
    each block's linears keep its all-gathered input, tp pieces' worth."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    attention = e * (2 * q + 2 * kv) + 4 * m.heads  # q, k after RoPE, v, output; float32 lse per head
    residuals, gathered = e * m.hidden * 2, 2 * (tp - 1) * e * m.hidden  # gathered: beyond the piece's own share
    return residuals + 2 * _norm_bytes(m.hidden, e) + attention + e * 4 * m.mlp_active + gathered


def _attention_buffer_bytes(m: ModelShape, mode: str, world: int, u: int, local: int, e: int) -> int:
    """Transient bytes of one attention call (the largest of forward and backward), per rank."""
    q, kv = m.heads * m.head_dim, kv_heads_sent(m.heads, m.kv_heads, u) * m.head_dim
    if mode == "allgather":  # full K/V, then the full dK/dV in float32
        return world * local * kv * (2 * e + 2 * 4) + local * q * 4
    tokens, q_part, kv_part = local * u, q // u, kv // u  # the Ulysses group's tokens, this rank's heads
    ring = (world // u) > 1
    in_flight = 2 * 2 * kv_part * e if ring else 0  # the K/V shard being sent and the one arriving
    forward = q_part * 4 + in_flight  # float32 output accumulator
    backward = q_part * 4 + (3 if ring else 1) * 2 * kv_part * 4 + in_flight  # dq, dK/dV (fresh, own, received)
    ring_side = tokens * max(forward, backward)
    a2a_side = tokens * (2 * q_part + 2 * kv_part) * e if u > 1 else 0
    return ring_side + a2a_side


def _loss_bytes(m: ModelShape, local: int, chunked: bool, e: int, lm_head_grad: int) -> int:
    """Logits and cross-entropy at their peak, the start of the backward. Plain: the log-softmax backward holds its
    saved float32 output, the gradient into it and the one out of it (12 B per logit), or later the logits'
    gradient with lm_head's weight gradient. Chunked (hf_seqpar/memory/chunked_loss.py): one float32 [chunk, vocab]
    buffer of ~32 MiB (recomputed logits turned into their gradient in place), lm_head's weight-gradient sum in
    float32 and one chunk's weight gradient: as measured by benchmarks/memory.py."""
    low = e if e != 4 else 0  # a bf16 model's logits before the float32 upcast
    if not chunked:
        return max(12 * local * m.vocab, (4 + low) * local * m.vocab + lm_head_grad)
    tokens = min(local, max(64, LOSS_CHUNK_BYTES // (4 * m.vocab)))
    running_sum = 4 * m.vocab * m.hidden if lm_head_grad else 0
    return (4 + low) * tokens * m.vocab + running_sum + lm_head_grad


def _lora_layer_peak(m: ModelShape, e: int, *, offload: bool, norms: bool, lora_inputs: bool, tiled: bool,
                     tp: int = 1) -> int:  # fmt: skip
    """(bytes per token at a checkpointed layer's peak, of which the stored part per layer is not included) for LoRA
    on a bf16 / fp16 model, term by term as benchmarks/memory_breakdown.py finds them (Llama-3-8B shape, 4K-256K
    tokens: the peak is the post-attention RMSNorm's backward while the attention half's recompute is alive):
    attention output, its float32 logsumexp and the residual adds; PEFT's float32 copies of the q, k, v, o inputs
    (recompute_lora_inputs: gone); the norms' float32 inputs (recompute_norms: the input norm's output only); the
    norm backward's float32 temporaries (five hidden-sized, one more when the norm is recomputed).
    Per token of this rank's piece under tensor parallelism: what lives on a block's gathered input (PEFT's copies of
    the q, k, v, gate, up inputs; the gathered input itself) is tp times larger, the head- and width-split rest not."""
    h, q, kv, f = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, 4
    attention = e * (2 * h + kv) + 4 * m.heads
    copies = e * kv + (0 if lora_inputs else f * (3 * h * tp + q))
    norm_saved = e * h if norms else 2 * f * h
    norm_backward = 5 * f * h + e * h + (f * h if norms else 0)
    gathered = (tp - 1) * e * h  # a block's all-gathered input beyond the piece's own share
    attention_half = attention + copies + norm_saved + norm_backward + gathered
    mlp = 0 if tiled else e * 4 * m.mlp_active + (0 if lora_inputs else f * (2 * h * tp + m.mlp_active))
    mlp_half = attention + norm_saved + e * h * tp + mlp  # the MLP's recompute, when it is not tiled
    copied_back = e * h if offload and norms else 0  # the layer input, kept by the recomputed norm
    return max(attention_half, mlp_half) + copied_back


def estimate_memory(
    m: ModelShape,
    seq_len: int,
    gpus: int,
    *,
    mode: str = "ring",
    ulysses: int = 1,
    batch: int = 1,
    lora: bool = False,
    dtype: str = "bfloat16",
    grad_ckpt: bool = True,
    tiled_mlp: bool = False,
    shard_weights: int = 1,
    offload: bool = False,
    recompute_norms: bool = False,
    recompute_lora_inputs: bool = False,
    tp: int = 1,
) -> dict:
    """Bytes per GPU, by component. `shard_weights`: ZeRO-3 / FSDP degree over which weights, gradients and
    optimizer states are split (1 = replicated, plain DDP-style sequence parallelism). `tiled_mlp`: the MLP runs
    over tiles of max(256, hidden) tokens, recomputed in the backward (hf_seqpar.memory.tiled): its four
    intermediates are never stored, one tile's exist at a time. `offload`: offload_checkpoints, the layer inputs
    that checkpointing keeps live in host memory (`host_bytes`), the embeddings' output stays. `recompute_norms`,
    `recompute_lora_inputs`: the SeqParConfig savings of those names (LoRA on a 16-bit model: see _lora_layer_peak).
    `tp`: SeqParConfig.tp_size, `gpus` = sp_size * tp_size; the split linears' weights, gradients and optimizer states
    (and their LoRA factors) are divided by tp, embeddings, norms and lm_head stay whole; between blocks a rank holds
    seq_len / gpus tokens, inside a block the sp shard's with 1/tp of the heads and MLP width (_layer_bytes)."""
    e = DTYPE_BYTES[dtype]
    local = batch * seq_len // gpus
    params = m.params - m.layers * m.split_per_layer * (tp - 1) // tp
    lora_params = m.lora_params - m.layers * m.lora_split_per_layer * (tp - 1) // tp
    trainable = lora_params if lora else params
    grad_bytes, opt_bytes = (4, 8) if lora or e == 4 else (e, 2 * e)  # LoRA adapters are float32 (PEFT's default)
    weights = params * e / shard_weights + (lora_params * 4 if lora else 0)
    gradients = trainable * grad_bytes / (1 if lora else shard_weights)
    optimizer = trainable * opt_bytes / (1 if lora else shard_weights)
    layer = _layer_bytes(m, e, tp)
    tile = 0
    if tiled_mlp:  # a tile of the sp shard's tokens through 1/tp of the MLP width
        layer -= e * 4 * m.mlp_active
        tile = min(local * tp, max(MLP_TILE_TOKENS, m.hidden)) * e * 4 * m.mlp_active // tp * 2  # and their grads
    head = e * m.hidden + _norm_bytes(m.hidden, e)  # embeddings' output, final norm
    lora16 = lora and e != 4 and grad_ckpt  # PEFT's float32 adapters on a 16-bit model: measured term by term
    host = local * m.layers * e * m.hidden if grad_ckpt and offload else 0
    if lora16:
        rope = 2 * e * m.head_dim  # cos, sin
        stored = local * ((e * m.hidden if offload else m.layers * e * m.hidden) + rope)
        working = local * _lora_layer_peak(
            m, e, offload=offload, norms=recompute_norms, lora_inputs=recompute_lora_inputs, tiled=tiled_mlp, tp=tp
        )
    elif grad_ckpt:  # each layer keeps its input; the backward recomputes one layer at a time
        stored = local * ((e * m.hidden if offload else m.layers * e * m.hidden) + head)
        working = local * layer
    else:
        stored, working = local * (m.layers * layer + head), 0
    working += 0 if lora16 else tile
    heads = dataclasses.replace(m, heads=m.heads // tp, kv_heads=m.kv_heads // tp)  # one TP rank's attention
    attention = _attention_buffer_bytes(heads, mode, gpus // tp, ulysses, local * tp // batch, e) * batch
    lm_head_grad = 0 if lora else m.vocab * m.hidden * grad_bytes
    loss = {c: _loss_bytes(m, local, c, e, lm_head_grad) for c in (False, True)}
    # lm_head's weight gradient exists from the loss backward on, through every layer's recompute
    if lora16:  # the peak is a norm's backward; the attention kernel's buffers and an MLP tile come at other moments
        other = max(attention, tile) + local * (e * (2 * m.hidden + m.kv_heads * m.head_dim) + 2 * 4 * m.hidden)
        step = {c: max(stored + loss[c], stored + max(working, other), gradients) for c in (False, True)}
    else:
        step = {
            c: max(stored + loss[c], stored + working + attention + lm_head_grad, gradients) for c in (False, True)
        }
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations_stored": stored,
        "host_bytes": host,
        "layer_recompute": working,
        "attention_buffers": attention,
        "loss_plain": loss[False],
        "loss_chunked": loss[True],
        "step_peak_plain": step[False],  # live bytes the step adds above weights (what benchmarks/memory.py measures)
        "step_peak_chunked": step[True],
        "total_plain": weights + optimizer + step[False],
        "total_chunked": weights + optimizer + step[True],
    }


# ---- split and time ---------------------------------------------------------------------------------------------


def recommend(m: ModelShape, gpus: int, nodes: int, tp: int = 1) -> tuple[str, int, int, str]:
    """(mode, ulysses, ring, reason): Ulysses inside a node over a degree that divides the query heads, ring across.
    With tp > 1 the sequence-parallel attention runs over gpus / tp ranks on each TP rank's heads."""
    if tp > 1:
        m, gpus = dataclasses.replace(m, heads=m.heads // tp, kv_heads=m.kv_heads // tp), gpus // tp
    per_node = gpus // nodes
    u = max(d for d in range(1, per_node + 1) if per_node % d == 0 and gpus % d == 0 and m.heads % d == 0)
    r = gpus // u
    ranks = "SP ranks" if tp > 1 else "GPUs"
    why = [f"{m.heads} query heads, {m.kv_heads} KV heads{' per TP rank' if tp > 1 else ''}, {per_node} {ranks} per "
           f"node x {nodes} node(s)"]  # fmt: skip
    if u > 1:
        rep = "" if m.kv_heads % u == 0 else f" (KV heads replicated to {kv_heads_sent(m.heads, m.kv_heads, u)})"
        why.append(f"Ulysses over {u}: the largest degree that divides the heads and stays in a node{rep}")
    if r > 1:
        where = "across nodes" if nodes > 1 else "inside the node"
        why.append(f"ring over {r} {where}: its P2P hops overlap the attention compute")
    mode = "ulysses" if r == 1 else "ring" if u == 1 else "usp"
    return mode, u, r, "; ".join(why)


def step_times(m: ModelShape, seq_len: int, gpus: int, nodes: int, gpu: GpuSpec, u: int, r: int, *, lora: bool,
               grad_ckpt: bool, batch: int = 1, mfu: float = 0.5, elem: int = 2, tp: int = 1) -> dict:  # fmt: skip
    """Seconds per step per GPU: compute at `mfu` of peak, and each link's transfer time if nothing overlapped.
    Tensor parallelism leaves the compute per GPU as it is (each rank: 1/tp of the linears on tp pieces' tokens) and
    adds its all-gathers and reduce-scatters, inside a node and on the critical path (exposed)."""
    local, sp = batch * seq_len // gpus, gpus // tp
    linear = (4 if lora else 6) + (2 if grad_ckpt else 0)
    flops = linear * m.params * local
    attn_fwd = 2 * batch * seq_len**2 * m.heads * m.head_dim / gpus  # causal, per rank and layer
    flops += m.layers * attn_fwd * (1 + 2.5 + (1 if grad_ckpt else 0))
    compute = flops / (gpu.bf16_tflops * 1e12 * mfu)
    mode = "ulysses" if r == 1 else "ring" if u == 1 else "usp"
    heads, kv = m.heads // tp, m.kv_heads // tp
    fwd, bwd = comm_bytes_per_layer(mode, sp, u, batch, seq_len // sp, heads, kv, m.head_dim, elem)
    passes = 2 if grad_ckpt else 1  # the recompute repeats the forward's collectives
    a2a = m.layers * (passes * fwd["all_to_all"] + bwd["all_to_all"])
    ring = m.layers * (passes * fwd["ring"] + bwd["ring"])
    tp_fwd, tp_bwd, tp_recompute = tp_comm_bytes_per_layer(tp, batch, seq_len // sp, m.hidden, elem)
    tp_bytes = m.layers * (sum(tp_fwd.values()) + sum(tp_bwd.values()) + grad_ckpt * sum(tp_recompute.values()))
    ring_link = gpu.inter_gbs if nodes > 1 and r > 1 else gpu.intra_gbs
    a2a_link = gpu.intra_gbs if u * tp <= gpus // nodes else gpu.inter_gbs  # TP ranks are innermost
    times = {
        "compute_s": compute,
        "all_to_all_bytes": a2a,
        "ring_bytes": ring,
        "tp_bytes": tp_bytes,
        "all_to_all_s": a2a / (a2a_link * 1e9),  # exposed: the attention waits for it
        "ring_s": ring / (ring_link * 1e9),  # overlapped with the compute of each hop while it is shorter
        "tp_s": tp_bytes / (gpu.intra_gbs * 1e9),  # exposed: each block waits for its input and output
        "ring_link_gbs": ring_link,
        "a2a_link_gbs": a2a_link,
    }
    times["exposed_s"] = times["all_to_all_s"] + times["tp_s"] + max(0.0, times["ring_s"] - compute)
    return times


def _gib(x) -> str:
    return f"{x / GIB:8.2f} GiB"


def _tp_problem(m: ModelShape, args, tp: int) -> str | None:
    """Why tp_size=tp cannot run this model on these GPUs (None: it can)."""
    per_node = args.gpus // args.nodes
    if tp == 1:
        return None
    if not m.dense:
        return "tensor parallelism splits dense blocks only; this model is a mixture of experts"
    if m.heads % tp or m.kv_heads % tp:
        return f"tp_size={tp} must divide num_attention_heads={m.heads} and num_key_value_heads={m.kv_heads}"
    if per_node % tp:
        return f"tp_size={tp} must divide the {per_node} GPUs of a node (tensor parallelism stays on NVLink)"
    if getattr(args, "zero3", False):
        return "tp_size > 1 trains with DistributedDataParallel; ZeRO-3 / FSDP with it are not supported"
    return None


def _check_tp(m: ModelShape, args) -> None:
    problem = _tp_problem(m, args, getattr(args, "tp_size", 1))
    if problem:
        raise ValueError(f"hf_seqpar: --tp-size {args.tp_size}: {problem}")


def _times(m: ModelShape, args, tp: int) -> dict:
    mode, u, r, _ = recommend(m, args.gpus, args.nodes, tp)
    return step_times(m, args.seq_len, args.gpus, args.nodes, GPUS[args.gpu], u, r, lora=args.lora, tp=tp,
                      grad_ckpt=not args.no_grad_ckpt, batch=args.batch, elem=DTYPE_BYTES[args.dtype])  # fmt: skip


def layouts(m: ModelShape, args) -> tuple[list[dict], dict, str]:
    """(rows, the recommended row, why): SP alone (tp_size=1, sp_size=gpus) against each TP x SP layout, tp_size in
    2, 4, 8 dividing the query and KV heads and a node's GPUs. Of those that fit, the least exposed communication
    per step (the compute per GPU is the same in every layout); when none fits, the least memory."""
    rows = []
    for tp in (1, 2, 4, 8):
        if _tp_problem(m, args, tp) is None:
            changed = argparse.Namespace(**{**vars(args), "tp_size": tp})
            mode = recommend(m, args.gpus, args.nodes, tp)[0] if args.gpus > tp else None
            need, t = _total(m, changed, args.seq_len, args.gpus), _times(m, args, tp)
            rows.append({"tp": tp, "sp": args.gpus // tp, "mode": mode, "need": need, "fits": need <= _usable(args),
                         "exposed_s": t["exposed_s"], "tp_s": t["tp_s"], "compute_s": t["compute_s"]})  # fmt: skip
    fitting = [r for r in rows if r["fits"]]
    best = min(fitting, key=lambda r: (r["exposed_s"], r["tp"])) if fitting else min(rows, key=lambda r: r["need"])
    alone, usable = rows[0], _usable(args) / GIB
    said = f"{best['need'] / GIB:.1f} GiB per GPU, {best['exposed_s']:.2f} s of exposed communication per step " \
           f"({best['exposed_s'] / best['compute_s']:.1%} of the compute)"  # fmt: skip
    if not fitting:
        return rows, best, f"none fits {usable:.1f} GiB usable; the least memory: {said}; see the verdict's changes"
    if best is alone:
        return rows, best, f"SP alone fits ({said}) and exposes the least communication"
    where = "does not fit" if not alone["fits"] else f"fits but exposes {alone['exposed_s']:.2f} s"
    why = [f"SP alone {where} ({alone['need'] / GIB:.1f} GiB per GPU of {usable:.1f} usable, all the weights on "
           f"every GPU); tp_size={best['tp']} fits with {said}, its TP collectives {best['tp_s']:.2f} s"]  # fmt: skip
    why += [f"tp_size={r['tp']} also fits ({r['need'] / GIB:.1f} GiB) but exposes {r['exposed_s']:.2f} s"
            for r in fitting if r is not best]  # fmt: skip
    if not alone["fits"] and not args.zero3:
        why.append("the other way to split the weights is SP alone with ZeRO-3 / FSDP2 (the verdict's changes; its "
                   "weight all-gathers are not in this estimate)")  # fmt: skip
    return rows, best, "; ".join(why)


def _layout_lines(m: ModelShape, args) -> list[str]:
    rows, best, why = layouts(m, args)
    loss = "chunked_loss" if args.chunked_loss else "plain loss"
    lines = [f"Layouts: SP alone against TP x SP on {args.gpus} x {args.gpu.upper()} ({loss}; communication exposed "
             "per step: all-to-all, TP collectives, ring beyond the compute)"]  # fmt: skip
    for r in rows:
        mode = f"mode={r['mode']}" if r["mode"] else "no SP attention"
        lines.append(f"  tp_size={r['tp']} x sp_size={r['sp']:<3} {mode:<16} {_gib(r['need'])}  "
                     f"{'fits         ' if r['fits'] else 'does not fit '} exposed {r['exposed_s']:7.2f} s"
                     + (f" (TP collectives {r['tp_s']:.2f} s)" if r["tp"] > 1 else ""))  # fmt: skip
    mode = f", mode={best['mode']}" if best["mode"] else ""
    return [*lines, f"Recommended layout: tp_size={best['tp']}, sp_size={best['sp']}{mode}: {why}"]


def report(args) -> str:
    name, m = load_model(args.model)
    gpu, tp = GPUS[args.gpu], getattr(args, "tp_size", 1)
    if args.gpus % args.nodes:
        raise ValueError(f"hf_seqpar: --gpus {args.gpus} must be a multiple of --nodes {args.nodes}")
    if args.seq_len % (2 * args.gpus):
        raise ValueError(f"hf_seqpar: --seq-len {args.seq_len} must be a multiple of 2 x gpus = {2 * args.gpus}")
    _check_tp(m, args)
    mode, u, r, why = recommend(m, args.gpus, args.nodes, tp)
    mem = _memory(m, args, args.seq_len, args.gpus)
    t = _times(m, args, tp)
    local = args.batch * args.seq_len // args.gpus
    lora = f" (LoRA r=16: {m.lora_params / 1e6:.1f}M trainable)" if args.lora else ""
    split = f"tp_size={tp} x sp_size={args.gpus // tp}, " if tp > 1 else ""
    split_note = f" (q/k/v/o and MLP weights split {tp} ways; embeddings, norms, lm_head whole)" if tp > 1 else ""
    lines = [
        f"{name}: {m.params / 1e9:.2f}B parameters{lora}, {m.layers} layers, {m.heads}/{m.kv_heads} heads of "
        f"{m.head_dim}",
        f"{args.seq_len:,} tokens x batch {args.batch} on {args.gpus} x {args.gpu.upper()} ({args.nodes} node(s)): "
        f"{split}{local:,} tokens per GPU, {args.dtype}, gradient checkpointing {'off' if args.no_grad_ckpt else 'on'}"
        + (", ZeRO-3 over all GPUs" if args.zero3 else "")
        + (", tiled MLP" if args.tiled_mlp else ""),
        "",
        "Memory per GPU" + split_note,
        f"  weights              {_gib(mem['weights'])}",
        f"  gradients            {_gib(mem['gradients'])}",
        f"  optimizer (AdamW)    {_gib(mem['optimizer'])}",
        f"  stored activations   {_gib(mem['activations_stored'])}",
        f"  layer recompute      {_gib(mem['layer_recompute'])}",
        f"  attention buffers    {_gib(mem['attention_buffers'])}   ({mode}, transient per layer)",
        f"  logits + loss        {_gib(mem['loss_plain'])}   plain;  {_gib(mem['loss_chunked'])} with chunked_loss",
        f"  total                {_gib(mem['total_plain'])}   plain;  {_gib(mem['total_chunked'])} with chunked_loss",
        f"    = weights + optimizer + the step's peak, max(activations + loss or recompute, gradients); of "
        f"{gpu.memory_gib} GB, keep ~4 GiB for the CUDA context and fragmentation",
        "",
        f"Split: {split}mode={mode}" + (f" (ulysses_size={u}, ring_size={r})" if mode == "usp" else ""),
        f"  because {why}",
        "",
        f"Per step (compute at 50% of {gpu.bf16_tflops:.0f} TFLOP/s; links {gpu.intra_gbs:.0f} GB/s in a node, "
        f"{gpu.inter_gbs:.0f} GB/s between nodes, per direction)",
        f"  compute              {t['compute_s']:8.2f} s",
        f"  all-to-all           {t['all_to_all_bytes'] / GIB:8.2f} GiB sent -> {t['all_to_all_s']:6.2f} s on "
        f"{t['a2a_link_gbs']:.0f} GB/s (exposed)",
        f"  ring P2P             {t['ring_bytes'] / GIB:8.2f} GiB sent -> {t['ring_s']:6.2f} s on "
        f"{t['ring_link_gbs']:.0f} GB/s (overlaps compute)",
    ]
    if tp > 1:
        lines.append(f"  TP gather / scatter  {t['tp_bytes'] / GIB:8.2f} GiB sent -> {t['tp_s']:6.2f} s on "
                     f"{gpu.intra_gbs:.0f} GB/s (exposed)")  # fmt: skip
    lines.append(f"  communication / compute: {(t['all_to_all_s'] + t['ring_s'] + t['tp_s']) / t['compute_s']:.1%}")
    if mem["host_bytes"]:
        lines.insert(13, f"  host (offloaded)     {_gib(mem['host_bytes'])}   layer checkpoints in pinned CPU memory")
    return "\n".join([*lines, "", *_layout_lines(m, args), "", verdict(m, args, args.seq_len)])


# ---- does it fit: the verdict, the cheapest change, the longest context -------------------------------------------

RESERVE_GIB = 4  # CUDA context, NCCL, fragmentation
SAVINGS = {  # flag -> SeqParConfig field, in the order a user should reach for them (exact and cheap first)
    "chunked_loss": "chunked_loss", "recompute_lora_inputs": "recompute_lora_inputs",
    "recompute_norms": "recompute_norms", "tiled_mlp": "tiled_mlp", "offload": "offload_checkpoints",
}  # fmt: skip


def _memory(m: ModelShape, args, seq_len: int, gpus: int) -> dict:
    tp = getattr(args, "tp_size", 1)
    mode, u, _, _ = recommend(m, gpus, args.nodes, tp)
    return estimate_memory(
        m, seq_len, gpus, mode=mode, ulysses=u, batch=args.batch, lora=args.lora, dtype=args.dtype,
        grad_ckpt=not args.no_grad_ckpt, tiled_mlp=args.tiled_mlp, shard_weights=gpus if args.zero3 else 1,
        offload=args.offload, recompute_norms=args.recompute_norms, recompute_lora_inputs=args.recompute_lora_inputs,
        tp=tp,
    )  # fmt: skip


def _total(m: ModelShape, args, seq_len: int, gpus: int) -> int:
    mem = _memory(m, args, seq_len, gpus)
    return mem["total_chunked" if args.chunked_loss else "total_plain"]


def _usable(args) -> float:
    return GPUS[args.gpu].memory_gib * 1e9 - RESERVE_GIB * GIB


def _changes(m: ModelShape, args):
    """Single changes, cheapest first: a saving not on yet, ZeRO-3 / FSDP2 (not with tensor parallelism), a larger
    tp_size on the same GPUs, then more GPUs for sequence parallelism."""
    tp = getattr(args, "tp_size", 1)
    for flag in SAVINGS:
        if not getattr(args, flag):
            yield f"{SAVINGS[flag]}: true", argparse.Namespace(**{**vars(args), flag: True})
    if not args.zero3 and tp == 1:
        yield "ZeRO-3 / FSDP2 (weights sharded over the GPUs)", argparse.Namespace(**{**vars(args), "zero3": True})
    for bigger in (t for t in (2, 4, 8) if t > tp and _tp_problem(m, args, t) is None):
        changed = argparse.Namespace(**{**vars(args), "tp_size": bigger})
        yield f"tp_size={bigger} (TP x SP, sp_size={args.gpus // bigger})", changed


def verdict(m: ModelShape, args, seq_len: int) -> str:
    """'fits' or 'does not fit' on the named GPU, and the cheapest change that makes it fit."""
    need, usable, gpu = _total(m, args, seq_len, args.gpus), _usable(args), args.gpu.upper()
    loss = " (chunked_loss)" if args.chunked_loss else " (plain loss)"
    if need <= usable:
        return f"Verdict: fits{loss}: {need / GIB:.1f} GiB of {usable / GIB:.1f} GiB usable per {gpu}"
    head = f"Verdict: does NOT fit{loss}: {need / GIB:.1f} GiB per GPU, {usable / GIB:.1f} GiB usable per {gpu}"
    for change, changed in _changes(m, args):
        if _total(m, changed, seq_len, args.gpus) <= usable:
            return (
                f"{head}. Cheapest change that fits: {change} ({_total(m, changed, seq_len, args.gpus) / GIB:.1f} GiB)"
            )
    zero3 = getattr(args, "tp_size", 1) == 1
    everything = argparse.Namespace(**{**vars(args), **dict.fromkeys(SAVINGS, True), "zero3": zero3 or args.zero3})
    for gpus in (args.gpus * k for k in (2, 4, 8, 16)):
        if seq_len % (2 * gpus) == 0 and _total(m, args, seq_len, gpus) <= usable:
            return f"{head}. Cheapest change that fits: more sequence parallelism, {gpus} GPUs"
    if _total(m, everything, seq_len, args.gpus) <= usable:
        return f"{head}. It fits with every saving on" + (" and ZeRO-3 / FSDP2 together" if zero3 else " together")
    return f"{head}. No single change fits it; shorten the sequence (--max-context) or add GPUs"


def max_context(m: ModelShape, args) -> int:
    """The longest sequence (a multiple of 1,024 and of 2 x gpus) whose estimate fits the GPUs' usable memory."""
    step = max(1024, 2 * args.gpus)
    usable, lo, hi = _usable(args), 0, step
    while _total(m, args, hi, args.gpus) <= usable and hi < 1 << 34:
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if _total(m, args, mid, args.gpus) <= usable else (lo, mid)
    return lo


def max_context_report(args) -> str:
    name, m = load_model(args.model)
    _check_tp(m, args)
    longest = max_context(m, args)
    on = [SAVINGS[f] for f in SAVINGS if getattr(args, f)] + (["ZeRO-3"] if args.zero3 else [])
    on += [f"tp_size={args.tp_size}"] if getattr(args, "tp_size", 1) > 1 else []
    lines = [
        f"{name} on {args.gpus} x {args.gpu.upper()}"
        + (", LoRA r=16" if args.lora else "")
        + ", "
        + (", ".join(on) if on else "no savings")
        + f": longest sequence that fits = {longest:,} tokens"
    ]
    if longest:
        need = _total(m, args, longest, args.gpus)
        host = _memory(m, args, longest, args.gpus)["host_bytes"]
        lines.append(
            f"  ({need / GIB:.1f} GiB per GPU of {_usable(args) / GIB:.1f} usable; "
            f"{host / GIB:.0f} GiB of host memory)"
        )
    return "\n".join(lines)


def cli(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="hf-seqpar estimate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"config.json, a directory with one, or {', '.join(PRESETS)}")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu", choices=tuple(GPUS), default="h100")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--tp-size", type=int, default=1, help="SeqParConfig(tp_size=...): TP x SP, --gpus = sp_size x tp_size"
    )
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on attention and MLP projections")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--zero3", action="store_true", help="weights, gradients, optimizer sharded over all GPUs")
    parser.add_argument("--tiled-mlp", action="store_true", help="SeqParConfig(tiled_mlp=True)")
    parser.add_argument("--offload", action="store_true", help="SeqParConfig(offload_checkpoints=True)")
    parser.add_argument("--recompute-norms", action="store_true", help="SeqParConfig(recompute_norms=True)")
    parser.add_argument(
        "--recompute-lora-inputs", action="store_true", help="SeqParConfig(recompute_lora_inputs=True)"
    )
    parser.add_argument(
        "--chunked-loss", action="store_true", help="judge the fit with SeqParConfig(chunked_loss=True)"
    )
    parser.add_argument("--max-context", action="store_true", help="the longest sequence that fits --gpus x --gpu")
    args = parser.parse_args(argv)
    try:
        print(max_context_report(args) if args.max_context else report(args))
    except ValueError as err:
        raise SystemExit(f"hf-seqpar estimate: error: {err}") from None
