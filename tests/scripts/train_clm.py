"""A plain Hugging Face Trainer script: causal-LM fine-tuning on a local JSON-lines file of {"text": ...} rows.

It knows nothing about hf_seqpar; the tests launch it unmodified with and without sequence parallelism. Two normal
extras: `--log_file` writes the Trainer's log history (rank 0), and `--sample_log_dir` records which dataset rows each
process read (the dataset appends indices to a file per rank), so a test can check how the data was split.
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
    TrainingArguments,
)


class TextRows(torch.utils.data.Dataset):
    def __init__(self, path, tokenizer, sample_log=None):
        with open(path) as f:
            texts = [json.loads(line)["text"] for line in f]
        self.rows = [tokenizer(text)["input_ids"] for text in texts]
        self.sample_log = sample_log

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if self.sample_log:
            with open(self.sample_log, "a") as f:
                f.write(f"{index}\n")
        return {"input_ids": self.rows[index]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--eval_file")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume_from_checkpoint")
    parser.add_argument("--log_file")
    parser.add_argument("--sample_log_dir")
    parser.add_argument("--gpu", action="store_true")
    cli = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(cli.model_dir)
    model = AutoModelForCausalLM.from_pretrained(cli.model_dir, dtype=torch.float32)
    sample_log = None
    if cli.sample_log_dir:
        sample_log = os.path.join(cli.sample_log_dir, f"rank{os.environ.get('RANK', '0')}.txt")
    train = TextRows(cli.train_file, tokenizer, sample_log)
    evaluation = TextRows(cli.eval_file, tokenizer) if cli.eval_file else None

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.batch_size,
        per_device_eval_batch_size=cli.batch_size,
        gradient_accumulation_steps=cli.grad_accum,
        optim="adamw_torch",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_steps=2,
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        seed=0,
        use_cpu=not cli.gpu,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        train_dataset=train,
        eval_dataset=evaluation,
    )
    trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)
    if cli.log_file and trainer.is_world_process_zero():
        with open(cli.log_file, "w") as f:
            json.dump(trainer.state.log_history, f)
    # Free the DDP model while its process group is registered, then destroy the group: the other order lets DDP's
    # reducer drop the group's last reference with the GIL held, which can deadlock gloo (pytorch/pytorch#56297).
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
