"""A plain Hugging Face Trainer script for sharded backends (DeepSpeed ZeRO, FSDP2): causal-LM fine-tuning of a local
model on a JSON-lines file of {"text": ...} rows, full or with a LoRA adapter.

It knows nothing about hf_seqpar; tests launch it unmodified with and without sequence parallelism. It builds
TrainingArguments before the model, as run_clm does, so that a ZeRO-3 config with zero3_init_flag partitions the
model while it loads. Test extras: `--log_file` writes the log history (rank 0); `--shard_report_dir` writes, per rank,
what the backend made of the parameters and the optimizer state after the first step (the tests check that they are
sharded: a backend that silently falls back to DDP would pass every loss comparison).
"""

import argparse
import gc
import json
import os

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)


class TextRows(torch.utils.data.Dataset):
    def __init__(self, path, tokenizer):
        with open(path) as f:
            self.rows = [tokenizer(json.loads(line)["text"])["input_ids"] for line in f]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index]}


def _numel(tensor) -> int:
    return sum(t.numel() for t in tensor) if isinstance(tensor, (list, tuple)) else tensor.numel()


def shard_report(model, optimizer, wrapped) -> dict:
    """Per parameter: (numel held by this rank, full numel, how); plus the optimizer's fp32 state held here."""
    from torch.distributed.tensor import DTensor

    params = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: this rank keeps ds_tensor, the module sees a gathered or empty p
            params[name] = [p.ds_tensor.numel(), p.ds_numel, "zero3"]
        elif isinstance(p, DTensor):  # FSDP2
            placements = [f"{type(x).__name__}({getattr(x, 'dim', '')})" for x in p.placements]  # Shard(0)
            params[name] = [p.to_local().numel(), p.numel(), f"dtensor {placements}"]
        else:
            params[name] = [p.numel(), p.numel(), "plain"]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer
    flat = getattr(inner, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    flat = flat if flat is not None else getattr(inner, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    return {
        "wrapper": type(wrapped).__name__,
        "optimizer": type(inner).__name__,
        "params": params,
        "fp32_partition_numel": None if flat is None else sum(_numel(t) for t in flat),
        "trainable_numel": sum(v[1] for k, v in params.items() if model.get_parameter(k).requires_grad),
    }


class ShardReport(TrainerCallback):
    def __init__(self, directory):
        self.directory = directory
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        path = os.path.join(self.directory, f"rank{os.environ.get('RANK', '0')}.json")
        if not os.path.exists(path):  # after the first step: ZeRO builds some of its state lazily
            trainer = self.trainer
            with open(path, "w") as f:
                json.dump(shard_report(trainer.model, trainer.optimizer, trainer.model_wrapped), f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--eval_file")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume_from_checkpoint")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--log_file")
    parser.add_argument("--shard_report_dir")
    cli = parser.parse_args()

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        eval_strategy="steps" if cli.eval_file else "no",
        eval_steps=2,
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        gradient_checkpointing=cli.gradient_checkpointing,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(cli.model_dir)
    model = AutoModelForCausalLM.from_pretrained(cli.model_dir, dtype=torch.float32)
    if cli.lora:
        from peft import LoraConfig, get_peft_model

        set_seed(0)  # the adapter's initial A matrices
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, lora)
    callbacks = [ShardReport(cli.shard_report_dir)] if cli.shard_report_dir else []
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        train_dataset=TextRows(cli.train_file, tokenizer),
        eval_dataset=TextRows(cli.eval_file, tokenizer) if cli.eval_file else None,
        callbacks=callbacks,
    )
    for callback in callbacks:
        callback.trainer = trainer
    trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)
    trainer.save_model(os.path.join(cli.output_dir, "final"))
    if cli.log_file and trainer.is_world_process_zero():
        with open(cli.log_file, "w") as f:
            json.dump(trainer.state.log_history, f)
    trainer.accelerator.free_memory()  # free the wrapped model while its process group lives (see train_clm.py)
    del trainer
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
