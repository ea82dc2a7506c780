"""Long-context LoRA for Qwen2.5-7B-Instruct at 262,144 tokens: USP (Ulysses 4 x ring 2) over 8 GPUs, a TRL SFTTrainer
script.

Qwen2.5 is trained to 32,768 positions and reaches 131,072 with YaRN x4 (its model card); this recipe sets YaRN x8
for 262,144 and fine-tunes at that length. Any TRL dataset format works ("text", "messages", "prompt"/"completion"):
examples are packed (best-fit decreasing, each keeps its own positions) into rows of --max_length tokens. LoRA (r=16)
on every linear layer, bf16 weights, gradient checkpointing. The script knows nothing about hf_seqpar:

    hf-seqpar launch --config_file recipes/qwen25_7b_256k_usp/accelerate_config.yaml \
        recipes/qwen25_7b_256k_usp/train.py --dataset long_sft.jsonl --output_dir out/qwen25-7b-256k

--tiny swaps in a 2-layer Qwen2 (YaRN x8), a word-level tokenizer and generated passkey documents, all built in code,
and CPU settings; try it on 2 CPU processes:

    hf-seqpar launch --config_file accelerate_configs/cpu_sp2.yaml \
        recipes/qwen25_7b_256k_usp/train.py --tiny --output_dir /tmp/qwen25-tiny
"""

import argparse
import gc
import json

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

MODEL = "Qwen/Qwen2.5-7B-Instruct"
NATIVE_POSITIONS = 32768  # Qwen2.5's original_max_position_embeddings for YaRN


def load_examples(name: str, split: str):
    if name.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=name, split=split)
    if name.endswith(".parquet"):
        return load_dataset("parquet", data_files=name, split=split)
    return load_dataset(name, split=split)


def yarn(max_length: int, native: int, rope_theta: float) -> dict:
    return {
        "rope_type": "yarn",
        "factor": max_length / native,
        "original_max_position_embeddings": native,
        "rope_theta": rope_theta,
    }


def tiny_setup(max_length: int, rows: int):
    """A 2-layer Qwen2 with YaRN x8, a word-level tokenizer, and passkey documents (no downloads)."""
    from hf_seqpar.demo import passkey, tiny

    config = tiny.tiny_config("qwen2", rope_parameters=yarn(max_length, max_length // 8, 1e6))
    # documents of ~half a row: packing puts two in most rows, each with its own positions
    documents = [{"text": f"{r['prompt']} {r['completion']}"} for r in passkey.passkey_rows(rows, 120, seed=1)]
    return tiny.tiny_model(config), tiny.word_tokenizer(), Dataset.from_list(documents)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--dataset", help="a .jsonl / .json / .parquet file or a Hub dataset name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_length", type=int, default=262144, help="tokens per packed row (per sequence)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_file", help="write the Trainer's log history here (JSON)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data built in code, on CPU")
    cli = parser.parse_args(argv)
    set_seed(cli.seed)  # before LoRA draws its initial weights
    if cli.tiny:
        cli.max_length = 256 if cli.max_length == parser.get_default("max_length") else cli.max_length
        cli.learning_rate = 1e-2 if cli.learning_rate == parser.get_default("learning_rate") else cli.learning_rate
        model, tokenizer, examples = tiny_setup(cli.max_length, rows=32)
    else:
        if not cli.dataset:
            parser.error("--dataset is required (or --tiny)")
        config = AutoConfig.from_pretrained(cli.model)
        config.rope_parameters = yarn(cli.max_length, NATIVE_POSITIONS, config.rope_parameters["rope_theta"])
        config.max_position_embeddings = cli.max_length
        model = AutoModelForCausalLM.from_pretrained(cli.model, config=config, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(cli.model)
        examples = load_examples(cli.dataset, cli.split)

    args = SFTConfig(
        output_dir=cli.output_dir,
        max_length=cli.max_length,
        packing=True,
        max_steps=4 if cli.tiny else cli.max_steps,
        per_device_train_batch_size=1,  # one packed row of max_length tokens per step, split over the SP group
        gradient_accumulation_steps=2 if cli.tiny else cli.gradient_accumulation_steps,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0 if cli.tiny else 10,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=not cli.tiny,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        logging_steps=1,
        save_strategy="no" if cli.tiny else "steps",
        save_steps=100,
        seed=cli.seed,
        use_cpu=cli.tiny,
        dataloader_num_workers=0 if cli.tiny else 2,
        report_to=[],
        disable_tqdm=cli.tiny,
    )
    # lora_dropout=0: dropout draws different masks on each rank, so the run could not equal the plain one exactly
    lora = LoraConfig(r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0, target_modules="all-linear")
    trainer = SFTTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(cli.output_dir)
    if cli.log_file and trainer.is_world_process_zero():
        with open(cli.log_file, "w") as f:
            json.dump(trainer.state.log_history, f)
    trainer.accelerator.free_memory()  # free DDP while its process group lives (gloo, pytorch/pytorch#56297)
    del trainer
    gc.collect()


if __name__ == "__main__":
    main()
