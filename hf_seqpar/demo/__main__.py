"""`make demo` (`python -m hf_seqpar.demo`): a long-context LoRA fine-tune with sequence parallelism on this CPU.

1. build a word-level tokenizer, a tiny Llama and passkey rows (nothing downloaded, fixed seeds);
2. pretrain the model on SHORT rows only: it retrieves the passkey there, and fails on long rows;
3. extend its context the way long-context fine-tunes do: YaRN rope scaling (as Qwen2.5 reaches 128K) and a LoRA
   fine-tune on long rows, with `hf-seqpar launch` on 2 processes (SP=2, ring) running the
   plain Trainer script `finetune.py` unchanged; then the same script as one plain process, the reference;
4. print both loss curves (the same numbers), tokens and peak memory per rank, passkey accuracy on held-out long rows
   before and after; save the adapter and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import passkey, report

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = Path(__file__).resolve().parent / "finetune.py"
CPU_SP2 = ROOT / "accelerate_configs" / "cpu_sp2.yaml"
SP2_SECTION = "hf_seqpar:\n  sp_size: 2\n  mode: ring\n"


@dataclass(frozen=True)
class Plan:
    long_length: int  # tokens per row of the fine-tune and of the accuracy check
    pretrain_steps: int
    yarn_factor: float  # the fine-tune's YaRN rope scaling: long_length / the longest pretraining row
    pretrain_lengths: tuple[int, int]
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    eval_rows: int
    seed: int = 0


FULL = Plan(
    long_length=2048,
    pretrain_steps=1500,
    yarn_factor=16.0,
    pretrain_lengths=(32, 128),
    finetune_steps=160,
    finetune_batch=4,
    finetune_lr=3e-3,
    eval_rows=100,
)
QUICK = Plan(  # the same path in seconds (tests): the model learns nothing worth measuring
    long_length=128,
    pretrain_steps=4,
    yarn_factor=2.0,
    pretrain_lengths=(32, 64),
    finetune_steps=3,
    finetune_batch=2,
    finetune_lr=3e-3,
    eval_rows=4,
)


def _say(text: str = "") -> None:
    print(text, flush=True)


# Only the Trainer's progress bar and our own lines: no loading / saving bars, warnings, or accelerator detection logs.
QUIET = {
    "PYTHONWARNINGS": "ignore",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",  # DeepSpeed, when installed, would warn that it found no GPU
    "HF_HUB_OFFLINE": "1",
}
EARLY_STEPS = 10  # the loss-curve comparison reports these separately: before rounding has compounded
SHOW_EVERY = 20  # of the Trainer's per-step log lines (the whole curve is in the table afterwards)


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_SEQPAR_")}
    return {**env, **QUIET, "OMP_NUM_THREADS": str(threads)}


def _stream(cmd: list, threads: int) -> str:
    """Run `cmd`, echoing its stdout as it comes (the progress bar goes straight to stderr); return the stdout."""
    _say("  $ " + " ".join(str(c) for c in cmd))
    process = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True, env=_env(threads))
    lines, logged = [], 0
    for line in process.stdout:
        lines.append(line)
        if line.startswith("{'loss'"):
            logged += 1
            if logged % SHOW_EVERY:
                continue
        print("    " + line, end="", flush=True)
    if process.wait() != 0:
        raise SystemExit(f"hf_seqpar demo: {cmd[0]} failed with exit code {process.returncode}")
    return "".join(lines)


def _hf_seqpar_launch() -> list:
    script = Path(sys.executable).parent / "hf-seqpar"
    return [script] if script.exists() else [sys.executable, "-c", "from hf_seqpar.__main__ import cli; cli()"]


def _finetune_args(plan: Plan, model_dir: Path, train_file: Path, out: Path, quiet: bool) -> list:
    return [
        FINETUNE,
        *("--model_dir", model_dir, "--train_file", train_file, "--output_dir", out),
        *("--max_steps", plan.finetune_steps, "--batch_size", plan.finetune_batch),
        *("--learning_rate", plan.finetune_lr, "--seed", plan.seed, "--yarn_factor", plan.yarn_factor),
        *("--log_file", out / "log.json", "--memory_dir", out),
        *(["--disable_tqdm"] if quiet else []),
    ]


def _with_yarn(model, factor: float):
    """The same weights under YaRN rope scaling (rotary embeddings hold no weights), as finetune.py sets it."""
    from transformers import AutoModelForCausalLM

    config = model.config
    yarn = {
        "rope_type": "yarn",
        "rope_theta": config.rope_parameters["rope_theta"],
        "factor": factor,
        "original_max_position_embeddings": config.max_position_embeddings,
    }
    config = config.__class__.from_dict(
        {
            **config.to_dict(),
            "rope_parameters": yarn,
            "max_position_embeddings": int(factor * config.max_position_embeddings),
        }
    )
    other = AutoModelForCausalLM.from_config(config)
    other.load_state_dict(model.state_dict())
    return other.eval()


def build_and_pretrain(plan: Plan, out: Path, threads: int) -> dict:
    """Stages 1-2: save the pretrained model and the data under `out`; return its passkey accuracies."""
    import torch

    from . import tiny
    from .pretrain import pretrain

    torch.set_num_threads(threads)
    tokenizer = tiny.word_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    config = tiny.tiny_config("llama", max_position_embeddings=plan.pretrain_lengths[1], rope_parameters=rope)
    model = tiny.tiny_model(config, seed=plan.seed)
    n_params = sum(p.numel() for p in model.parameters())
    train_rows = plan.finetune_steps * plan.finetune_batch
    rows = passkey.passkey_rows(train_rows, plan.long_length, seed=plan.seed + 1)
    held_out = passkey.passkey_rows(plan.eval_rows, plan.long_length, seed=plan.seed + 2)
    short = passkey.passkey_rows(plan.eval_rows, plan.pretrain_lengths[1], seed=plan.seed + 3)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, data in (("train", rows), ("held_out", held_out)):
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    _say(
        f"[1/5] a tiny Llama ({n_params:,} parameters, {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, {config.num_attention_heads} heads / {config.num_key_value_heads} KV heads), a "
        f"{len(tiny.VOCAB)}-word "
        f"tokenizer, {train_rows} training rows and {plan.eval_rows} held-out rows of {plan.long_length:,} tokens"
    )
    words = rows[0]["prompt"].split()
    _say(f"      a row: <s> {' '.join(words[:10])} ... {' '.join(words[-10:])} | {rows[0]['completion']}")
    _say(
        f"[2/5] pretraining on short rows only ({plan.pretrain_lengths[0]}-{plan.pretrain_lengths[1]} tokens, "
        f"{plan.pretrain_steps} steps, plain PyTorch, one process)"
    )
    pretrain(model, tokenizer, steps=plan.pretrain_steps, seed=plan.seed, lengths=plan.pretrain_lengths, report=_say)
    model.save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    extended = _with_yarn(model, plan.yarn_factor)
    return {
        "short": passkey.accuracy(model, tokenizer, short),
        "long": passkey.accuracy(model, tokenizer, held_out),
        "before": passkey.accuracy(extended, tokenizer, held_out),
    }


def accuracy_after(out: Path, adapter: Path) -> float:
    """Held-out accuracy of the pretrained weights under the fine-tune's config (saved with the adapter), plus the
    adapter."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(out / "pretrained", config=config)
    model = PeftModel.from_pretrained(base, adapter)
    rows = [json.loads(line) for line in (out / "data" / "held_out.jsonl").read_text().splitlines()]
    return passkey.accuracy(model, AutoTokenizer.from_pretrained(out / "pretrained"), rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_seqpar.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same path in seconds, on short rows (tests)")
    parser.add_argument("--out", default="demo_output", help="where the model, adapter, logs and PNG go")
    cli = parser.parse_args(argv)
    os.environ.update({k: v for k, v in QUIET.items() if k != "PYTHONWARNINGS"})  # before transformers is imported
    warnings.simplefilter("ignore", FutureWarning)
    plan = QUICK if cli.quick else FULL
    out = Path(cli.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = min(2, os.cpu_count() or 1)
    started = time.perf_counter()

    accuracy = build_and_pretrain(plan, out, threads)
    before = accuracy["before"]
    _say(
        f"      passkey accuracy: {accuracy['short']:.0%} on rows of {plan.pretrain_lengths[1]} tokens, "
        f"{accuracy['long']:.0%} on the held-out rows of {plan.long_length:,} tokens; {before:.0%} there with the "
        f"YaRN x{plan.yarn_factor:g} rope scaling (where the fine-tune starts)"
    )
    config = CPU_SP2
    if not config.exists():  # outside a clone: the same file, written here
        config = out / "cpu_sp2.yaml"
        config.write_text(
            "distributed_type: MULTI_CPU\nnum_machines: 1\nnum_processes: 2\nuse_cpu: true\n" + SP2_SECTION
        )
    train_file = out / "data" / "train.jsonl"
    _say(
        f"[3/5] LoRA fine-tune on rows of {plan.long_length:,} tokens, YaRN x{plan.yarn_factor:g}, "
        "SP=2: 2 processes, each holding half of every row"
    )
    sp_stdout = _stream(
        [
            *_hf_seqpar_launch(),
            "launch",
            "--config_file",
            config,
            *_finetune_args(plan, out / "pretrained", train_file, out / "sp", cli.quick),
        ],
        threads=1,
    )
    _say("[4/5] the same script as one plain process (no hf_seqpar): the reference")
    _stream([sys.executable, *_finetune_args(plan, out / "pretrained", train_file, out / "plain", cli.quick)], threads)

    _say("[5/5] results")
    sp, plain = report.loss_curve(out / "sp" / "log.json"), report.loss_curve(out / "plain" / "log.json")
    _say(report.loss_table(sp, plain))
    early, _, _ = report.worst_relative_difference(sp, plain, first=EARLY_STEPS)
    worst, step, key = report.worst_relative_difference(sp, plain)
    first = min(EARLY_STEPS, len(plain))
    _say(
        f"  worst relative difference SP vs plain (loss and grad_norm): {early:.1e} over the first {first} "
        f"steps, {worst:.1e} over all {len(plain)} ({key}, step {step})"
    )
    if worst > early:  # say why, once it shows
        _say(
            "    (each step starts from weights that differ by float32 rounding, and training amplifies such "
            "differences step after step)"
        )
    found = report.tokens_per_rank(sp_stdout)
    if found:
        per_rank, rows, local, full = found
        _say(
            f"  tokens per rank per step: plain {rows} x {full:,} = {rows * full:,};  "
            f"SP=2 {rows} x {local:,} = {per_rank:,}"
        )
    memory_plain, memory_sp = report.memory_records(out / "plain"), report.memory_records(out / "sp")
    _say("  peak memory per rank (resident set, Linux):\n" + report.memory_table(memory_plain, memory_sp))
    after = accuracy_after(out, out / "sp")
    png = out / "demo.png"
    title = f"tiny Llama, passkey at {plan.long_length:,} tokens: accuracy {before:.0%} -> {after:.0%}"
    drawn = report.plot(png, sp, plain, memory_plain, memory_sp, title)
    _say(f"  adapter: {out / 'sp'}  (adapter_model.safetensors)")
    _say(f"  plot: {png}" if drawn else "  plot: skipped, matplotlib is not installed: pip install 'hf_seqpar[bench]'")
    _say(
        f"  {plan.eval_rows} held-out passkey rows of {plan.long_length:,} tokens; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    _say(f"accuracy before {before:.1%}, after {after:.1%}")


if __name__ == "__main__":
    main()
