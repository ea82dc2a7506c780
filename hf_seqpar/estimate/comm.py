"""Communication per layer (the formulas benchmarks/comm_volume.py and tp_comm_volume.py check on gloo), the
split to use, and the time of a step."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from .shapes import GpuSpec, ModelShape

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
