"""`hf-seqpar estimate`: memory per GPU, the split to use, and communication against compute, before renting GPUs.

Analytic, from the model's config.json (or a preset) and the run's shape. The memory terms follow what a Hugging Face
decoder stores during one training step (per local token and layer, from the modules' autograd saves: the residual
stream, two RMSNorm intermediates and output, q / k / v after RoPE, the attention output, the four MLP
intermediates); they are checked against benchmarks/memory.py's measurements (tests/test_estimate.py).
Communication uses the same per-layer formulas as benchmarks/comm_volume.py, which measures them on gloo.
"""

from __future__ import annotations

import argparse
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
        attn = h * heads * d * 2 + h * kv * d * 2
        if cfg.get("model_type") in ("qwen3", "qwen3_moe"):  # RMSNorm of each q and k head
            attn += 2 * d
        norms = 4 if cfg.get("model_type") in ("gemma2", "gemma3", "gemma3_text") else 2  # pre and post norms
        per_layer = attn + mlp_params + norms * h
        embed = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
        lora_attn = lora_rank * (2 * (h + heads * d) + 2 * (h + kv * d))
        return cls(
            layers, h, heads, kv, d, vocab, active, layers * per_layer + embed + h, layers * (lora_attn + lora_mlp)
        )


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


def tp_comm_bytes_per_layer(tp, batch, sp_tokens, hidden, elem):
    """(forward, backward, recompute) bytes one TP rank sends per decoder layer through the Megatron-SP regions
    (integrations/tensor_parallel.py): each of the two blocks (attention, MLP) all-gathers its input
    [batch, sp_tokens / tp, hidden] -> [batch, sp_tokens, hidden] and reduce-scatters its output back, (tp-1)/tp of
    the gathered tensor's bytes each (ring algorithm). Backward: the transposes, the same bytes. Recompute (gradient
    checkpointing): both all-gathers and the attention block's reduce-scatter (the MLP block's output is saved by
    nothing, and the non-reentrant recompute stops once the saved tensors are back)."""
    each = Fraction(tp - 1, tp) * batch * sp_tokens * hidden * elem
    both = {"all_gather": int(2 * each), "reduce_scatter": int(2 * each)}
    return both, dict(both), {"all_gather": int(2 * each), "reduce_scatter": int(each)}


# ---- memory ---------------------------------------------------------------------------------------------------------


def _norm_bytes(h: int, e: int) -> int:
    """RMSNorm in float32: the upcast input (bf16 models), x * rsqrt, the output in the model dtype."""
    return (4 * h if e != 4 else 0) + 4 * h + e * h


def _layer_bytes(m: ModelShape, e: int) -> int:
    """Bytes one decoder layer keeps per token for the backward, without checkpointing."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    attention = e * (2 * q + 2 * kv) + 4 * m.heads  # q, k after RoPE, v, output; float32 lse per head
    return e * m.hidden * 2 + 2 * _norm_bytes(m.hidden, e) + attention + e * 4 * m.mlp_active  # + residuals


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


def _lora_layer_peak(m: ModelShape, e: int, *, offload: bool, norms: bool, lora_inputs: bool, tiled: bool) -> tuple:
    """(bytes per token at a checkpointed layer's peak, of which the stored part per layer is not included) for LoRA
    on a bf16 / fp16 model, term by term as benchmarks/memory_breakdown.py finds them (Llama-3-8B shape, 4K-256K
    tokens: the peak is the post-attention RMSNorm's backward while the attention half's recompute is alive):
    attention output, its float32 logsumexp and the residual adds; PEFT's float32 copies of the q, k, v, o inputs
    (recompute_lora_inputs: gone); the norms' float32 inputs (recompute_norms: the input norm's output only); the
    norm backward's float32 temporaries (five hidden-sized, one more when the norm is recomputed)."""
    h, q, kv, f = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, 4
    attention = e * (2 * h + kv) + 4 * m.heads
    copies = e * kv + (0 if lora_inputs else f * (3 * h + q))
    norm_saved = e * h if norms else 2 * f * h
    norm_backward = 5 * f * h + e * h + (f * h if norms else 0)
    attention_half = attention + copies + norm_saved + norm_backward
    mlp = 0 if tiled else e * 4 * m.mlp_active + (0 if lora_inputs else f * (2 * h + m.mlp_active))
    mlp_half = attention + norm_saved + e * h + mlp  # the MLP's recompute, when it is not tiled
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
) -> dict:
    """Bytes per GPU, by component. `shard_weights`: ZeRO-3 / FSDP degree over which weights, gradients and
    optimizer states are split (1 = replicated, plain DDP-style sequence parallelism). `tiled_mlp`: the MLP runs
    over tiles of max(256, hidden) tokens, recomputed in the backward (hf_seqpar.memory.tiled): its four
    intermediates are never stored, one tile's exist at a time. `offload`: offload_checkpoints, the layer inputs
    that checkpointing keeps live in host memory (`host_bytes`), the embeddings' output stays. `recompute_norms`,
    `recompute_lora_inputs`: the SeqParConfig savings of those names (LoRA on a 16-bit model: see _lora_layer_peak)."""
    e = DTYPE_BYTES[dtype]
    local = batch * seq_len // gpus
    trainable = m.lora_params if lora else m.params
    grad_bytes, opt_bytes = (4, 8) if lora or e == 4 else (e, 2 * e)  # LoRA adapters are float32 (PEFT's default)
    weights = m.params * e / shard_weights + (m.lora_params * 4 if lora else 0)
    gradients = trainable * grad_bytes / (1 if lora else shard_weights)
    optimizer = trainable * opt_bytes / (1 if lora else shard_weights)
    layer = _layer_bytes(m, e)
    tile = 0
    if tiled_mlp:
        layer -= e * 4 * m.mlp_active
        tile = min(local, max(MLP_TILE_TOKENS, m.hidden)) * e * 4 * m.mlp_active * 2  # intermediates and their grads
    head = e * m.hidden + _norm_bytes(m.hidden, e)  # embeddings' output, final norm
    lora16 = lora and e != 4 and grad_ckpt  # PEFT's float32 adapters on a 16-bit model: measured term by term
    host = local * m.layers * e * m.hidden if grad_ckpt and offload else 0
    if lora16:
        rope = 2 * e * m.head_dim  # cos, sin
        stored = local * ((e * m.hidden if offload else m.layers * e * m.hidden) + rope)
        working = local * _lora_layer_peak(
            m, e, offload=offload, norms=recompute_norms, lora_inputs=recompute_lora_inputs, tiled=tiled_mlp
        )
    elif grad_ckpt:  # each layer keeps its input; the backward recomputes one layer at a time
        stored = local * ((e * m.hidden if offload else m.layers * e * m.hidden) + head)
        working = local * layer
    else:
        stored, working = local * (m.layers * layer + head), 0
    working += 0 if lora16 else tile
    attention = _attention_buffer_bytes(m, mode, gpus, ulysses, local // batch, e) * batch
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


def recommend(m: ModelShape, gpus: int, nodes: int) -> tuple[str, int, int, str]:
    """(mode, ulysses, ring, reason): Ulysses inside a node over a degree that divides the query heads, ring across."""
    per_node = gpus // nodes
    u = max(d for d in range(1, per_node + 1) if per_node % d == 0 and gpus % d == 0 and m.heads % d == 0)
    r = gpus // u
    why = [f"{m.heads} query heads, {m.kv_heads} KV heads, {per_node} GPUs per node x {nodes} node(s)"]
    if u > 1:
        rep = "" if m.kv_heads % u == 0 else f" (KV heads replicated to {kv_heads_sent(m.heads, m.kv_heads, u)})"
        why.append(f"Ulysses over {u}: the largest degree that divides the heads and stays in a node{rep}")
    if r > 1:
        where = "across nodes" if nodes > 1 else "inside the node"
        why.append(f"ring over {r} {where}: its P2P hops overlap the attention compute")
    mode = "ulysses" if r == 1 else "ring" if u == 1 else "usp"
    return mode, u, r, "; ".join(why)


def step_times(m: ModelShape, seq_len: int, gpus: int, nodes: int, gpu: GpuSpec, u: int, r: int, *, lora: bool,
               grad_ckpt: bool, batch: int = 1, mfu: float = 0.5, elem: int = 2) -> dict:  # fmt: skip
    """Seconds per step per GPU: compute at `mfu` of peak, and each link's transfer time if nothing overlapped."""
    local = batch * seq_len // gpus
    linear = (4 if lora else 6) + (2 if grad_ckpt else 0)
    flops = linear * m.params * local
    attn_fwd = 2 * batch * seq_len**2 * m.heads * m.head_dim / gpus  # causal, per rank and layer
    flops += m.layers * attn_fwd * (1 + 2.5 + (1 if grad_ckpt else 0))
    compute = flops / (gpu.bf16_tflops * 1e12 * mfu)
    mode = "ulysses" if r == 1 else "ring" if u == 1 else "usp"
    fwd, bwd = comm_bytes_per_layer(mode, gpus, u, batch, local // batch, m.heads, m.kv_heads, m.head_dim, elem)
    passes = 2 if grad_ckpt else 1  # the recompute repeats the forward's collectives
    a2a = m.layers * (passes * fwd["all_to_all"] + bwd["all_to_all"])
    ring = m.layers * (passes * fwd["ring"] + bwd["ring"])
    ring_link = gpu.inter_gbs if nodes > 1 and r > 1 else gpu.intra_gbs
    a2a_link = gpu.intra_gbs if u <= gpus // nodes else gpu.inter_gbs
    return {
        "compute_s": compute,
        "all_to_all_bytes": a2a,
        "ring_bytes": ring,
        "all_to_all_s": a2a / (a2a_link * 1e9),  # exposed: the attention waits for it
        "ring_s": ring / (ring_link * 1e9),  # overlapped with the compute of each hop while it is shorter
        "ring_link_gbs": ring_link,
        "a2a_link_gbs": a2a_link,
    }


def _gib(x) -> str:
    return f"{x / GIB:8.2f} GiB"


def report(args) -> str:
    name, m = load_model(args.model)
    gpu = GPUS[args.gpu]
    if args.gpus % args.nodes:
        raise ValueError(f"hf_seqpar: --gpus {args.gpus} must be a multiple of --nodes {args.nodes}")
    if args.seq_len % (2 * args.gpus):
        raise ValueError(f"hf_seqpar: --seq-len {args.seq_len} must be a multiple of 2 x gpus = {2 * args.gpus}")
    mode, u, r, why = recommend(m, args.gpus, args.nodes)
    mem = _memory(m, args, args.seq_len, args.gpus)
    t = step_times(m, args.seq_len, args.gpus, args.nodes, gpu, u, r, lora=args.lora, grad_ckpt=not args.no_grad_ckpt,
                   batch=args.batch, elem=DTYPE_BYTES[args.dtype])  # fmt: skip
    local = args.batch * args.seq_len // args.gpus
    lora = f" (LoRA r=16: {m.lora_params / 1e6:.1f}M trainable)" if args.lora else ""
    lines = [
        f"{name}: {m.params / 1e9:.2f}B parameters{lora}, {m.layers} layers, {m.heads}/{m.kv_heads} heads of "
        f"{m.head_dim}",
        f"{args.seq_len:,} tokens x batch {args.batch} on {args.gpus} x {args.gpu.upper()} ({args.nodes} node(s)): "
        f"{local:,} tokens per GPU, {args.dtype}, gradient checkpointing {'off' if args.no_grad_ckpt else 'on'}"
        + (", ZeRO-3 over all GPUs" if args.zero3 else "")
        + (", tiled MLP" if args.tiled_mlp else ""),
        "",
        "Memory per GPU",
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
        f"Split: mode={mode}" + (f" (ulysses_size={u}, ring_size={r})" if mode == "usp" else ""),
        f"  because {why}",
        "",
        f"Per step (compute at 50% of {gpu.bf16_tflops:.0f} TFLOP/s; links {gpu.intra_gbs:.0f} GB/s in a node, "
        f"{gpu.inter_gbs:.0f} GB/s between nodes, per direction)",
        f"  compute              {t['compute_s']:8.2f} s",
        f"  all-to-all           {t['all_to_all_bytes'] / GIB:8.2f} GiB sent -> {t['all_to_all_s']:6.2f} s on "
        f"{t['a2a_link_gbs']:.0f} GB/s (exposed)",
        f"  ring P2P             {t['ring_bytes'] / GIB:8.2f} GiB sent -> {t['ring_s']:6.2f} s on "
        f"{t['ring_link_gbs']:.0f} GB/s (overlaps compute)",
        f"  communication / compute: {(t['all_to_all_s'] + t['ring_s']) / t['compute_s']:.1%}",
    ]
    if mem["host_bytes"]:
        lines.insert(13, f"  host (offloaded)     {_gib(mem['host_bytes'])}   layer checkpoints in pinned CPU memory")
    return "\n".join(lines + ["", verdict(m, args, args.seq_len)])


# ---- does it fit: the verdict, the cheapest change, the longest context -------------------------------------------

RESERVE_GIB = 4  # CUDA context, NCCL, fragmentation
SAVINGS = {  # flag -> SeqParConfig field, in the order a user should reach for them (exact and cheap first)
    "chunked_loss": "chunked_loss", "recompute_lora_inputs": "recompute_lora_inputs",
    "recompute_norms": "recompute_norms", "tiled_mlp": "tiled_mlp", "offload": "offload_checkpoints",
}  # fmt: skip


def _memory(m: ModelShape, args, seq_len: int, gpus: int) -> dict:
    mode, u, _, _ = recommend(m, gpus, args.nodes)
    return estimate_memory(
        m, seq_len, gpus, mode=mode, ulysses=u, batch=args.batch, lora=args.lora, dtype=args.dtype,
        grad_ckpt=not args.no_grad_ckpt, tiled_mlp=args.tiled_mlp, shard_weights=gpus if args.zero3 else 1,
        offload=args.offload, recompute_norms=args.recompute_norms, recompute_lora_inputs=args.recompute_lora_inputs,
    )  # fmt: skip


def _total(m: ModelShape, args, seq_len: int, gpus: int) -> int:
    mem = _memory(m, args, seq_len, gpus)
    return mem["total_chunked" if args.chunked_loss else "total_plain"]


def _usable(args) -> float:
    return GPUS[args.gpu].memory_gib * 1e9 - RESERVE_GIB * GIB


def _changes(args):
    """Single changes, cheapest first: a saving not on yet, ZeRO-3 / FSDP2, then more GPUs for sequence parallelism."""
    for flag in SAVINGS:
        if not getattr(args, flag):
            yield f"{SAVINGS[flag]}: true", argparse.Namespace(**{**vars(args), flag: True})
    if not args.zero3:
        yield "ZeRO-3 / FSDP2 (weights sharded over the GPUs)", argparse.Namespace(**{**vars(args), "zero3": True})


def verdict(m: ModelShape, args, seq_len: int) -> str:
    """'fits' or 'does not fit' on the named GPU, and the cheapest change that makes it fit."""
    need, usable, gpu = _total(m, args, seq_len, args.gpus), _usable(args), args.gpu.upper()
    loss = " (chunked_loss)" if args.chunked_loss else " (plain loss)"
    if need <= usable:
        return f"Verdict: fits{loss}: {need / GIB:.1f} GiB of {usable / GIB:.1f} GiB usable per {gpu}"
    head = f"Verdict: does NOT fit{loss}: {need / GIB:.1f} GiB per GPU, {usable / GIB:.1f} GiB usable per {gpu}"
    for change, changed in _changes(args):
        if _total(m, changed, seq_len, args.gpus) <= usable:
            return (
                f"{head}. Cheapest change that fits: {change} ({_total(m, changed, seq_len, args.gpus) / GIB:.1f} GiB)"
            )
    everything = argparse.Namespace(**{**vars(args), **dict.fromkeys(SAVINGS, True), "zero3": True})
    for gpus in (args.gpus * k for k in (2, 4, 8, 16)):
        if seq_len % (2 * gpus) == 0 and _total(m, args, seq_len, gpus) <= usable:
            return f"{head}. Cheapest change that fits: more sequence parallelism, {gpus} GPUs"
    if _total(m, everything, seq_len, args.gpus) <= usable:
        return f"{head}. It fits with every saving on and ZeRO-3 / FSDP2 together"
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
    longest = max_context(m, args)
    on = [SAVINGS[f] for f in SAVINGS if getattr(args, f)] + (["ZeRO-3"] if args.zero3 else [])
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
