"""A plain Hugging Face Trainer script: LoRA fine-tuning of a causal LM on {"prompt", "completion"} rows of a
JSON-lines file, with the loss on the completion only.

It knows nothing about hf_seqpar. `make demo` runs it twice, unchanged:
    python finetune.py --model_dir M --train_file F --output_dir O                      # one process, whole rows
    hf-seqpar launch --config_file accelerate_configs/cpu_sp2.yaml finetune.py ...     # 2 processes, half a row each
Two extras of the kind scripts carry: --log_file writes the Trainer's log history (rank 0), --memory_dir a file per
rank with its peak memory during training.
"""

import argparse
import gc
import json
import os
import re
import resource

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)


def read_rows(path, tokenizer):
    rows = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return rows


def _status_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class PeakMemory(TrainerCallback):
    """Resident memory of this process at the start of training and its peak during training (Linux)."""

    def __init__(self, directory):
        self.directory = directory

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_kib = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak, to the current size
            self.whole_process = False
        except OSError:
            self.whole_process = True  # the peak then includes what happened before training

    def on_train_end(self, args, state, control, **kwargs):
        peak_kib = _status_kib("VmHWM") if not self.whole_process else resource.getrusage(resource.RUSAGE_SELF)[2]
        rank = int(os.environ.get("RANK", "0"))
        record = {"rank": rank, "start_mib": self.start_kib / 1024, "peak_mib": peak_kib / 1024}
        with open(os.path.join(self.directory, f"memory_rank{rank}.json"), "w") as f:
            json.dump({**record, "whole_process": self.whole_process}, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--yarn_factor", type=float, help="extend the context this many times with YaRN rope scaling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_file")
    parser.add_argument("--memory_dir")
    parser.add_argument("--disable_tqdm", action="store_true")
    cli = parser.parse_args()

    set_seed(cli.seed)  # before LoRA draws its initial weights: every run and every process starts from the same ones
    tokenizer = AutoTokenizer.from_pretrained(cli.model_dir)
    config = AutoConfig.from_pretrained(cli.model_dir)
    if cli.yarn_factor:  # positions stretched by the factor, high frequencies kept, attention sharpened (YaRN)
        config.rope_parameters = {
            "rope_type": "yarn",
            "rope_theta": config.rope_parameters["rope_theta"],
            "factor": cli.yarn_factor,
            "original_max_position_embeddings": config.max_position_embeddings,
        }
        config.max_position_embeddings = int(cli.yarn_factor * config.max_position_embeddings)
    model = AutoModelForCausalLM.from_pretrained(cli.model_dir, config=config, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # lora_dropout=0: dropout draws other masks on each process, so the runs could not be compared number by number
    lora = LoraConfig(r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, lora)

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, cli.max_steps // 10),
        weight_decay=0.0,
        max_grad_norm=1.0,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        logging_steps=1,
        save_strategy="no",
        seed=cli.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=cli.disable_tqdm,
    )
    callbacks = [PeakMemory(cli.memory_dir)] if cli.memory_dir else []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=read_rows(cli.train_file, tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=callbacks,
    )
    trainer.train()
    trainer.save_model(cli.output_dir)  # the adapter (PEFT saves only its own weights)
    if trainer.is_world_process_zero():
        config.save_pretrained(cli.output_dir)  # the base model's config as trained (its rope scaling)
    if cli.log_file and trainer.is_world_process_zero():
        with open(cli.log_file, "w") as f:
            json.dump(trainer.state.log_history, f)
    # Free the DDP model while its process group is registered, then destroy the group (the other order can
    # deadlock gloo, pytorch/pytorch#56297).
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
