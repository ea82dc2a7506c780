"""Long-context LoRA for Mistral-7B-v0.1 at 65,536 tokens with its 4,096-token sliding window: Ulysses over 4 GPUs
(2 data-parallel groups on 8), a TRL SFTTrainer script.

Each layer attends only 4,096 tokens back, so positions never get further apart than the model was trained on, and
the window's reach grows with depth (32 layers x 4,096). Examples are {"prompt", "completion"} rows (a long document
and a question; the answer), one per row, loss on the completion only. LoRA (r=16) on every linear layer, bf16 weights,
gradient checkpointing. The script knows nothing about hf_seqpar:

    hf-seqpar launch --config_file recipes/mistral_7b_64k_sliding/accelerate_config.yaml \
        recipes/mistral_7b_64k_sliding/train.py --dataset long_qa.jsonl --output_dir out/mistral-7b-64k

--tiny swaps in a 2-layer Mistral (a 48-token window), a word-level tokenizer and generated passkey rows, all built
in code, and CPU settings; try it on 2 CPU processes:

    hf-seqpar launch --config_file accelerate_configs/cpu_sp2.yaml \
        recipes/mistral_7b_64k_sliding/train.py --tiny --output_dir /tmp/mistral-tiny
"""

import argparse
import gc
import json

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

MODEL = "mistralai/Mistral-7B-v0.1"  # sliding_window 4096 in its config (v0.2 and later dropped the window)


def load_examples(name: str, split: str):
    if name.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=name, split=split)
    if name.endswith(".parquet"):
        return load_dataset("parquet", data_files=name, split=split)
    return load_dataset(name, split=split)


def tiny_setup(max_length: int, rows: int):
    """A 2-layer Mistral with a 48-token window, a word-level tokenizer, and passkey rows (no downloads)."""
    from hf_seqpar.demo import passkey, tiny

    config = tiny.tiny_config("mistral", sliding_window=48)
    examples = passkey.passkey_rows(rows, max_length - 1, seed=1)  # TRL appends EOS to the completion
    return tiny.tiny_model(config), tiny.word_tokenizer(), Dataset.from_list(examples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--dataset", help="a .jsonl / .json / .parquet file or a Hub dataset name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_length", type=int, default=65536, help="longest example in tokens (longer are cut)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_file", help="write the Trainer's log history here (JSON)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data built in code, on CPU")
    cli = parser.parse_args(argv)
    set_seed(cli.seed)  # before LoRA draws its initial weights
    if cli.tiny:
        cli.max_length = 256 if cli.max_length == parser.get_default("max_length") else cli.max_length
        cli.learning_rate = 1e-2 if cli.learning_rate == parser.get_default("learning_rate") else cli.learning_rate
        model, tokenizer, examples = tiny_setup(cli.max_length, rows=8)
    else:
        if not cli.dataset:
            parser.error("--dataset is required (or --tiny)")
        model = AutoModelForCausalLM.from_pretrained(cli.model, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(cli.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token  # Mistral ships none; batches of 1 need none
        examples = load_examples(cli.dataset, cli.split)

    args = SFTConfig(
        output_dir=cli.output_dir,
        max_length=cli.max_length,
        packing=False,  # one long example per row
        max_steps=4 if cli.tiny else cli.max_steps,
        per_device_train_batch_size=1,  # one example per step and data-parallel group, split over its 4 SP ranks
        gradient_accumulation_steps=1 if cli.tiny else cli.gradient_accumulation_steps,
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
