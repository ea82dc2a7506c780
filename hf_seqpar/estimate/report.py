"""The report of `hf-seqpar estimate`: layouts, the verdict and the cheapest change, the longest context, the CLI."""

from __future__ import annotations

import argparse

from .comm import recommend, step_times
from .memory import estimate_memory
from .shapes import DTYPE_BYTES, GIB, GPUS, PRESETS, ModelShape, load_model


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
