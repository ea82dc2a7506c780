"""Long-context LoRA for Llama-3.1-8B at 655,360 tokens on ONE GPU (an H200; 524,288 on an H100), a plain Trainer.

No sequence parallelism: one GPU holds the whole sequence, and the memory savings of the accelerate config's
`hf_seqpar:` section (chunked loss, tiled MLP, layer checkpoints offloaded to host memory, recomputed RMSNorms and
LoRA inputs) make it fit. Documents (a JSON-lines / JSON / Parquet file or a Hub dataset with a text column) are
tokenized, each ended with EOS, concatenated and cut into rows of --max_length tokens; the loss is on every token.
Llama-3.1's llama3 RoPE scaling (x8, for 131,072 positions) is stretched to --max_length. LoRA (r=16) on every
linear layer, bf16 weights, gradient checkpointing. The script knows nothing about hf_seqpar:

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True hf-seqpar launch \
        --config_file recipes/llama31_8b_640k_1gpu/accelerate_config.yaml recipes/llama31_8b_640k_1gpu/train.py \
        --dataset long_documents.jsonl --output_dir out/llama31-8b-640k      # H100: add --max_length 524288

--tiny swaps in a 2-layer Llama (the same RoPE stretch), a word-level tokenizer and generated passkey documents,
all built in code, and CPU settings; try it on 1 CPU process:

    hf-seqpar launch --config_file recipes/llama31_8b_640k_1gpu/accelerate_config.yaml --cpu \
        recipes/llama31_8b_640k_1gpu/train.py --tiny --output_dir /tmp/llama31-640k-tiny
"""

import argparse
import gc
import itertools
import json

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

MODEL = "meta-llama/Llama-3.1-8B"
NATIVE_POSITIONS = 131072  # Llama-3.1's positions: llama3 RoPE scaling x8 of its 8,192 pre-training positions


def stretch_rope(config, max_length: int, native: int) -> None:
    """Scale the llama3 RoPE factor by max_length / native (x8 -> x40 at 655,360), as Llama-3.1 did from 8,192."""
    if max_length > native:
        rope = dict(config.rope_parameters)
        rope["factor"] = rope["factor"] * max_length / native
        config.rope_parameters = rope
        config.max_position_embeddings = max_length


def load_documents(name: str, split: str):
    if name.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=name, split=split)
    if name.endswith(".parquet"):
        return load_dataset("parquet", data_files=name, split=split)
    return load_dataset(name, split=split)


def packed_rows(documents, tokenizer, text_field: str, max_length: int):
    """Every document + EOS, concatenated, cut into rows of exactly max_length tokens (a partial last row is cut)."""

    def tokenize(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=True)["input_ids"]
        return {"input_ids": [row + [tokenizer.eos_token_id] for row in ids]}

    def cut(batch):
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        rows = [stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
        return {"input_ids": rows, "labels": [list(row) for row in rows]}

    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names)
    return tokenized.map(cut, batched=True, batch_size=2000, remove_columns=tokenized.column_names)


def tiny_setup(max_length: int, rows: int):
    """A 2-layer Llama whose llama3 RoPE is stretched x2, a word-level tokenizer, passkey documents (no downloads)."""
    from hf_seqpar.demo import passkey, tiny

    native = max_length // 2
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    rope["original_max_position_embeddings"] = native // 8
    config = tiny.tiny_config("llama", rope_parameters=rope, max_position_embeddings=native)
    stretch_rope(config, max_length, native)
    documents = [
        {"text": f"{row['prompt']} {row['completion']}"} for row in passkey.passkey_rows(rows, max_length // 2, seed=1)
    ]
    return tiny.tiny_model(config), tiny.word_tokenizer(), Dataset.from_list(documents)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--dataset", help="a .jsonl / .json / .parquet file or a Hub dataset name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--max_length", type=int, default=655360, help="tokens per row (H100: 524288)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_file", help="write the Trainer's log history here (JSON)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data built in code, on CPU")
    cli = parser.parse_args(argv)
    set_seed(cli.seed)  # before LoRA draws its initial weights
    if cli.tiny:
        # 4,096 tokens: several MLP tiles (256 tokens each) and layer inputs of 1 MiB, so offload copies them
        cli.max_length = 4096 if cli.max_length == parser.get_default("max_length") else cli.max_length
        cli.learning_rate = 5e-3 if cli.learning_rate == parser.get_default("learning_rate") else cli.learning_rate
        model, tokenizer, documents = tiny_setup(cli.max_length, rows=16)
    else:
        if not cli.dataset:
            parser.error("--dataset is required (or --tiny)")
        config = AutoConfig.from_pretrained(cli.model)
        stretch_rope(config, cli.max_length, NATIVE_POSITIONS)
        tokenizer = AutoTokenizer.from_pretrained(cli.model)
        model = AutoModelForCausalLM.from_pretrained(cli.model, config=config, dtype=torch.bfloat16)
        documents = load_documents(cli.dataset, cli.split)
    train_rows = packed_rows(documents, tokenizer, cli.text_field, cli.max_length)
    lora = LoraConfig(r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=4 if cli.tiny else cli.max_steps,
        per_device_train_batch_size=1,  # one 655,360-token row per step (about 18 minutes of an H200, estimated)
        gradient_accumulation_steps=2 if cli.tiny else cli.gradient_accumulation_steps,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0 if cli.tiny else 5,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=not cli.tiny,
        activation_checkpointing=True,  # offload_checkpoints moves what it keeps to host memory
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no" if cli.tiny else "steps",
        save_steps=10,
        seed=cli.seed,
        use_cpu=cli.tiny,
        dataloader_num_workers=0 if cli.tiny else 2,
        report_to=[],
        disable_tqdm=cli.tiny,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=default_data_collator)
    trainer.train()
    trainer.save_model(cli.output_dir)
    if cli.log_file and trainer.is_world_process_zero():
        with open(cli.log_file, "w") as f:
            json.dump(trainer.state.log_history, f)
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()


if __name__ == "__main__":
    main()
