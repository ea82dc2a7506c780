"""Memory per GPU of one training step, per term (weights, optimizer, activations, attention buffers, loss)."""

from __future__ import annotations

import dataclasses

from .comm import kv_heads_sent
from .shapes import DTYPE_BYTES, LOSS_CHUNK_BYTES, MLP_TILE_TOKENS, ModelShape

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
    norm backward's float32 temporaries (five hidden-sized; with recompute_norms one sequence chunk's, and the peak
    holds o_proj's recompute instead).
    Per token of this rank's piece under tensor parallelism: what lives on a block's gathered input (PEFT's copies of
    the q, k, v, gate, up inputs; the gathered input itself) is tp times larger, the head- and width-split rest not."""
    h, q, kv, f = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim, 4
    attention = e * (2 * h + kv) + 4 * m.heads
    copies = e * kv + (0 if lora_inputs else f * (3 * h * tp + q))
    norm_saved = e * h if norms else 2 * f * h
    # recompute_norms: the chunked norm backward holds one chunk's temporaries, so the peak term is the incoming
    # gradient plus o_proj's recompute (its output and LoRA's float32 delta and its scaled copy)
    norm_backward = e * h + (e * h + 2 * f * h if norms else 5 * f * h)
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
