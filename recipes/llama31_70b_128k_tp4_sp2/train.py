"""Long-context LoRA for Llama-3.1-70B at 131,072 tokens on one node of 8 GPUs: TP 4 x SP 2, a plain Trainer script.

The bf16 weights (131 GiB) do not fit on one 80 GB GPU, so sequence parallelism alone cannot carry them: the
accelerate config's `hf_seqpar:` section splits each decoder block's linears over 4 tensor-parallel ranks (Megatron-SP)
and the sequence over 2 Ulysses ranks, the layout `hf-seqpar estimate --model llama3-70b --seq-len 131072 --gpus 8
--lora --chunked-loss` recommends (68.8 GiB per H100, estimated). Documents (a JSON-lines / JSON / Parquet file or a
Hub dataset with a text column) are tokenized, each ended with EOS, concatenated and cut into rows of --max_length
tokens; the loss is on every token. LoRA (r=16) on every linear layer, bf16 weights, gradient checkpointing. The script
knows nothing about hf_seqpar:

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True hf-seqpar launch \
        --config_file recipes/llama31_70b_128k_tp4_sp2/accelerate_config.yaml \
        recipes/llama31_70b_128k_tp4_sp2/train.py --dataset long_documents.jsonl --output_dir out/llama31-70b-128k

Host memory: like any plain script, each of the 8 processes loads the whole bf16 model (141 GB) into host memory;
hf_seqpar splits it at the end of `Trainer.__init__` (the Trainer's move to the GPU waits for the split), after which
a process keeps its TP rank's piece (38 GB: a quarter of the block linears, embeddings, norms and lm_head whole).
Until then the node holds up to 8 copies, about 1.13 TB of host RAM (a DGX H100 has 2 TB; a node with less needs
swap, or loading that does not copy).

--tiny swaps in a 2-layer Llama (Llama-3.1's rope scaling; 8 query / 4 KV heads, so TP 2 x Ulysses 2 divides them),
a word-level tokenizer and generated passkey documents, all built in code, and CPU settings; try it on 4 CPU processes
with a config whose `hf_seqpar:` section is `{sp_size: 2, tp_size: 2, mode: ulysses, chunked_loss: true}`:

    hf-seqpar launch --config_file cpu_tp2_sp2.yaml \
        recipes/llama31_70b_128k_tp4_sp2/train.py --tiny --output_dir /tmp/llama31-70b-tiny
"""

import argparse
import gc
import itertools
import json

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

MODEL = "meta-llama/Llama-3.1-70B"


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
    """A 2-layer Llama with Llama-3.1's rope scaling and 8 query / 4 KV heads of 8 (Llama-3.1-70B: 64 / 8 of 128),
    a word-level tokenizer, and passkey documents (no downloads)."""
    from hf_seqpar.demo import passkey, tiny

    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    config = tiny.tiny_config("llama", rope_parameters={**rope, "original_max_position_embeddings": max_length // 8})
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 4, 8  # hidden 64 = 8 heads x 8
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
    parser.add_argument("--max_length", type=int, default=131072, help="tokens per row (per sequence)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=200)
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
        model, tokenizer, documents = tiny_setup(cli.max_length, rows=16)
    else:
        if not cli.dataset:
            parser.error("--dataset is required (or --tiny)")
        tokenizer = AutoTokenizer.from_pretrained(cli.model)
        model = AutoModelForCausalLM.from_pretrained(cli.model, dtype=torch.bfloat16)
        documents = load_documents(cli.dataset, cli.split)
    train_rows = packed_rows(documents, tokenizer, cli.text_field, cli.max_length)
    # lora_dropout=0: dropout draws different masks on each rank, so the run could not equal the plain one exactly
    lora = LoraConfig(r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=4 if cli.tiny else cli.max_steps,
        # one 131,072-token row per step over all 8 GPUs (DP 1): about 41 s of an H100 node, estimated
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2 if cli.tiny else cli.gradient_accumulation_steps,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0 if cli.tiny else 20,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=not cli.tiny,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        logging_steps=1,
        save_strategy="no" if cli.tiny else "steps",
        save_steps=50,
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
    trainer.accelerator.free_memory()  # free DDP while its process group lives (gloo, pytorch/pytorch#56297)
    del trainer
    gc.collect()


if __name__ == "__main__":
    main()
