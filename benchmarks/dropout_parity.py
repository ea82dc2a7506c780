"""Benchmark: with LoRA dropout on, SP=2 training equals plain training statistically (not bit for bit).

Under SP each rank draws its own dropout masks (hf_seqpar/integrations/rng.py), so an SP run and a plain run with the
same seed see different masks: their loss curves differ the way two plain runs with different seeds differ. This
script measures that. A tiny Llama (hidden 64, 2 layers, random init) with LoRA r=8 on every projection,
lora_dropout=0.1, learns a successor task (each 64-token document follows a fixed random permutation of the
vocabulary from a random first token; two documents packed per step, 128 tokens, 64 per rank) for `--steps` AdamW
steps, plain and SP=2 (ring, gloo, 2 processes), for each training seed (model, adapter init and data fixed; the
seed drives dropout only). Reported, over steps and seeds:
  seed_noise     mean |plain_a(t) - plain_b(t)|, over pairs of seeds a != b: what dropout alone moves the curve
  sp_gap         mean |sp_s(t) - plain_s(t)|, same seed s: SP against plain
  gap_ratio      sp_gap / seed_noise: about 1 when SP is one more draw of the same process (0 would mean equal masks)
  mean_bias      mean over seeds and steps of sp_s(t) - plain_s(t), against its standard error over seeds
and the control: with lora_dropout=0 the SP curve equals the plain one to float rounding (max relative difference).

Usage: python benchmarks/dropout_parity.py [--steps 40] [--seeds 4] [--p 0.1]
Writes benchmarks/results/dropout_cpu.json and prints the table (about a minute on 2 busy cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_name  # noqa: E402

import hf_seqpar  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, DOC, DOCS_PER_STEP = 64, 64, 2


def _model(p: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_seqpar.demo.tiny import TINY_SHAPE  # the demo's tiny Llama: hidden 64, 2 layers, 4 / 2 heads of 16

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, **TINY_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=targets)
    return get_peft_model(model, lora).train()


def _data(steps: int) -> list[list[torch.Tensor]]:
    """Documents that follow a fixed random permutation of the vocabulary from a random first token."""
    gen = torch.Generator().manual_seed(0)
    successor = torch.randperm(VOCAB, generator=gen)
    docs = []
    for _ in range(steps * DOCS_PER_STEP):
        doc = [int(torch.randint(VOCAB, (), generator=gen))]
        while len(doc) < DOC:
            doc.append(int(successor[doc[-1]]))
        docs.append(torch.tensor(doc))
    return [docs[i : i + DOCS_PER_STEP] for i in range(0, len(docs), DOCS_PER_STEP)]


def _pack(features):
    ids = torch.cat([f["input_ids"] for f in features])[None]
    pos = torch.cat([torch.arange(len(f["input_ids"])) for f in features])[None]
    labels = ids.clone()
    labels[0, [i * DOC for i in range(len(features))]] = -100  # a document's first token is nobody's target
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _train(p: float, seed: int, steps: int, sp: tuple | None) -> list[float]:
    """Loss per step; `sp` = (config, groups) for the sequence-parallel run (the SP group's summed loss)."""
    model = _model(p)
    if sp is not None:
        model = hf_seqpar.apply_sequence_parallel(model, config=sp[0], groups=sp[1])
        collate = hf_seqpar.SequenceShardingCollator(_pack, config=sp[0], groups=sp[1])
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    torch.manual_seed(seed)  # every process alike, as the Trainer's set_seed
    losses = []
    for docs in _data(steps):
        features = [{"input_ids": d} for d in docs]
        if sp is None:
            batch = _pack(features)
            loss = model(**batch, use_cache=False).loss  # with a cache, upstream lets packed documents see each other
            loss.backward()
            losses.append(loss.item())
        else:
            batch = collate(features)
            n = (batch["shift_labels"] != -100).sum()
            dist.all_reduce(n)
            loss = model(**batch, num_items_in_batch=n, use_cache=False).loss
            loss.backward()
            for q in params:
                dist.all_reduce(q.grad)  # the SP group's sum is the plain gradient (API.md)
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses


def _worker(rank, world, store, opts, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = hf_seqpar.SeqParConfig(sp_size=world, mode="ring")
    sp = (cfg, hf_seqpar.init_groups(cfg))
    runs = {}
    for seed in range(opts.seeds):
        runs[("sp", opts.p, seed)] = _train(opts.p, seed, opts.steps, sp)
    runs[("sp", 0.0, 0)] = _train(0.0, 0, opts.steps, sp)
    plain = [(opts.p, s) for s in range(opts.seeds)] + [(0.0, 0)]
    for p, seed in plain[rank::world]:  # the plain runs, shared out between the processes
        runs[("plain", p, seed)] = _train(p, seed, opts.steps, None)
    gathered = [None] * world
    dist.all_gather_object(gathered, runs)
    if rank == 0:
        merged = {}
        for part in gathered:
            for key, curve in part.items():
                merged.setdefault(key, curve)  # SP curves: rank 0's (every rank holds the same summed loss)
        queue.put(merged)
    dist.destroy_process_group()


def summarise(runs: dict, p: float, seeds: int, steps: int) -> dict:
    plain = [runs[("plain", p, s)] for s in range(seeds)]
    sp = [runs[("sp", p, s)] for s in range(seeds)]
    steps_range = range(steps)
    seed_noise = statistics.fmean(abs(a[t] - b[t]) for a, b in itertools.combinations(plain, 2) for t in steps_range)
    sp_gap = statistics.fmean(abs(sp[s][t] - plain[s][t]) for s in range(seeds) for t in steps_range)
    per_seed_bias = [statistics.fmean(sp[s][t] - plain[s][t] for t in steps_range) for s in range(seeds)]
    bias = statistics.fmean(per_seed_bias)
    bias_se = statistics.stdev(per_seed_bias) / seeds**0.5
    tail = max(1, steps // 4)
    plain_tail = [statistics.fmean(c[-tail:]) for c in plain]
    sp_tail = [statistics.fmean(c[-tail:]) for c in sp]
    control = max(abs(x - y) / abs(y) for x, y in zip(runs[("sp", 0.0, 0)], runs[("plain", 0.0, 0)], strict=True))
    return {
        "seed_noise": seed_noise,
        "sp_gap": sp_gap,
        "gap_ratio": sp_gap / seed_noise,
        "mean_bias": bias,
        "mean_bias_standard_error": bias_se,
        "last_steps": tail,
        "plain_last_steps_loss": [statistics.fmean(plain_tail), statistics.stdev(plain_tail)],
        "sp_last_steps_loss": [statistics.fmean(sp_tail), statistics.stdev(sp_tail)],
        "first_loss": plain[0][0],
        "dropout0_max_relative_difference": control,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--p", type=float, default=0.1, help="lora_dropout")
    parser.add_argument("--out", type=Path, default=RESULTS / "dropout_cpu.json")
    opts = parser.parse_args(argv)
    if opts.seeds < 2:
        parser.error("--seeds must be at least 2: the seed-to-seed noise needs two seeds")
    start = time.perf_counter()
    queue = mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "store"), opts, queue), nprocs=2)
    runs = queue.get()
    summary = summarise(runs, opts.p, opts.seeds, opts.steps)
    report = {
        "machine": machine_name("cpu"),
        "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary,
        "curves": {f"{kind} p={p} seed={seed}": curve for (kind, p, seed), curve in sorted(runs.items())},
    }
    s, (plain_mean, plain_sd), (sp_mean, sp_sd) = (
        summary,
        summary["plain_last_steps_loss"],
        summary["sp_last_steps_loss"],
    )
    print(f"lora_dropout={opts.p}, {opts.seeds} seeds x {opts.steps} steps, SP=2 (ring) vs plain")
    print(f"  loss at step 0 {s['first_loss']:.3f}; last {s['last_steps']} steps' mean over seeds:")
    print(f"    plain {plain_mean:.4f} +- {plain_sd:.4f}   SP {sp_mean:.4f} +- {sp_sd:.4f}")
    print(
        f"  seed-to-seed noise {s['seed_noise']:.4f}   SP-vs-plain gap {s['sp_gap']:.4f}   ratio {s['gap_ratio']:.2f}"
    )
    print(f"  mean bias SP - plain {s['mean_bias']:+.4f} (standard error {s['mean_bias_standard_error']:.4f})")
    print(f"  control, lora_dropout=0: max relative difference {s['dropout0_max_relative_difference']:.1e}")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {opts.out} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main()
