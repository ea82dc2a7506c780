"""Benchmark: one LoRA training step, tokens per second and model FLOP utilisation: hf_seqpar's sp_size=1 path (its
collator and attention kernels, backend='auto') against plain transformers with SDPA, on the same model and row.

Model: Llama-3-8B's shape (hidden 4096, 32 / 8 heads of 128, intermediate 14,336, vocab 128,256) with --layers
decoder layers (4 by default), random init, bfloat16 weights, LoRA r=16 on every linear layer (PEFT), gradient
checkpointing (non-reentrant), AdamW on the adapters. One packed-free row of --seqs tokens. `--tiny` (CPU): a small
Llama in float32, to test the plumbing; its times mean nothing.

Model FLOPs per step (the usual MFU convention, recompute not counted): 6 x adapter parameters x tokens, plus 4 x
frozen parameters x tokens (forward, and the backward's input gradients only), plus causal attention: forward
2 x 2 x S^2 / 2 x H x d per layer, backward 2.5 times the forward (FA2's count). MFU = model FLOPs / (seconds x the
chip's dense bf16 peak), --peak-tflops (989 for H100 / H200 SXM).

Usage: python benchmarks/train_step.py [--device cuda] [--layers 4] [--seqs 32768,131072] [--steps 3]
Writes benchmarks/results/train_step_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402
from memory import MODELS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_8B = {k: v for k, v in MODELS["llama3-8b"].items() if k != "num_hidden_layers"}  # memory.py's Llama-3-8B shape
SHAPES = {
    "llama3-8b": {**_8B, "head_dim": _8B["hidden_size"] // _8B["num_attention_heads"]},
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        head_dim=16,
    ),  # fmt: skip
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, layers: int, seq: int, dtype, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"rope_theta": 5e5, **SHAPES[shape]}, num_hidden_layers=layers, max_position_embeddings=seq)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0))


def model_flops(model, seq: int, shape: dict, layers: int) -> float:
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "embed_tokens" not in n)
    attention_fwd = 2 * 2 * seq * seq / 2 * shape["num_attention_heads"] * shape["head_dim"] * layers
    return 6 * adapters * seq + 4 * frozen * seq + 3.5 * attention_fwd


def step_seconds(arm: str, opts, seq: int, device) -> dict:
    import hf_seqpar

    dtype = torch.float32 if opts.tiny else torch.bfloat16
    shape = "tiny" if opts.tiny else "llama3-8b"
    model = build(shape, opts.layers, seq, dtype, device)
    ids = torch.randint(3, SHAPES[shape]["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if arm == "hf_seqpar_sp1":
        config = hf_seqpar.SeqParConfig(sp_size=1)
        groups = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
        hf_seqpar.apply_sequence_parallel(model, config=config, groups=groups)
        batch = hf_seqpar.SequenceShardingCollator(lambda rows: rows[0], config=config, groups=groups)([batch])
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(1 + opts.steps):
        sync()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    flops = model_flops(model, seq, SHAPES[shape], opts.layers)
    row = {"arm": arm, "seq": seq, "seconds": seconds, "tokens_per_s": seq / seconds, "model_flops": flops,
           "mfu": flops / seconds / (opts.peak_tflops * 1e12), "loss": loss.item()}  # fmt: skip
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the chip")
    parser.add_argument("--tiny", action="store_true", help="a small float32 Llama (CPU plumbing check)")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    opts.tiny = opts.tiny or device.type == "cpu"
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier on a shared machine
    opts.seqs = opts.seqs or ([256] if opts.tiny else [32768, 131072])
    rows = []
    for seq in opts.seqs:
        for arm in ("transformers_sdpa", "hf_seqpar_sp1"):
            rows.append(step_seconds(arm, opts, seq, device))
            r = rows[-1]
            print(f"{seq:>7} {arm:<18} {r['seconds']:.3f} s  {r['tokens_per_s']:,.0f} tok/s  MFU {r['mfu']:.3f}")
    report = {"machine": machine_name(device), "torch": torch.__version__, "settings": vars(opts) | {"out": None},
              "results": rows}  # fmt: skip
    out = opts.out or RESULTS / f"train_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
