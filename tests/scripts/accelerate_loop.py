"""A custom training loop on its own `accelerate.Accelerator`, switched with `hf_seqpar.SequenceParallelPlugin`.

`--sp_size 1` is the plain loop (one process); `--sp_size 2` under torchrun is sequence parallel. Each optimizer step
accumulates `--grad_accum` micro-batches, its loss normalised by the step's targets. Rank 0 writes one
{"loss", "grad_norm"} row per optimizer step to `--log_file`.
"""

import argparse
import gc
import json

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

from hf_seqpar import SeqParConfig, SequenceParallelPlugin


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--log_file", required=True)
    parser.add_argument("--sp_size", type=int, default=1)
    parser.add_argument("--mode", default="ring")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    cli = parser.parse_args()

    torch.manual_seed(0)
    plugin = SequenceParallelPlugin(SeqParConfig(sp_size=cli.sp_size, mode=cli.mode))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cli.grad_accum)
    tokenizer = AutoTokenizer.from_pretrained(cli.model_dir)
    model = AutoModelForCausalLM.from_pretrained(cli.model_dir, dtype=torch.float32)
    with open(cli.train_file) as f:
        rows = [{"input_ids": tokenizer(json.loads(line)["text"])["input_ids"]} for line in f][:16]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    loader = torch.utils.data.DataLoader(rows, batch_size=cli.batch_size, collate_fn=collator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = plugin.prepare(accelerator, model, optimizer, loader)

    log = []
    model.train()
    for micro_batches in zip(*[iter(loader)] * cli.grad_accum, strict=False):
        num_items = plugin.num_items_in_batch(*micro_batches)  # the step's targets, over the world
        step_loss = 0.0
        for batch in micro_batches:
            loss = plugin.loss(model, batch, num_items)
            accelerator.backward(loss)
            # each rank holds local_sum / N * world * grad_accum: the world's mean over grad_accum sums to the loss
            step_loss += accelerator.gather(loss.detach()).mean().item() / cli.grad_accum
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        log.append({"loss": step_loss, "grad_norm": grad_norm.item()})
    if accelerator.is_main_process:
        with open(cli.log_file, "w") as f:
            json.dump(log, f)
    # Free the DDP model while its process group is registered, then destroy the group (see train_clm.py).
    accelerator.free_memory()
    del model, optimizer, loader
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
