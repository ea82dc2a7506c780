"""A plain accelerate training loop, as transformers' run_clm_no_trainer.py writes it; no hf_seqpar anywhere.

`python accelerate_plain_loop.py ...` is the plain run; under `hf-seqpar launch` (sp_size > 1) the same file must log
the same numbers. Rank 0 writes {"micro": [...], "steps": [...], "eval_loss": ...} to `--log_file`: each micro-batch's
loss as this rank sees it (`loss.item()`) and as the world's mean (`accelerator.gather`), each optimizer step's
grad_norm (clip_grad_norm_) and learning rate, and the eval loss the way run_clm_no_trainer computes it.
"""

import argparse
import gc
import json

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, get_scheduler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--eval_file", required=True)
    parser.add_argument("--log_file", required=True)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--mixed_precision", default="no")
    cli = parser.parse_args()

    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=cli.grad_accum, mixed_precision=cli.mixed_precision
    )
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(cli.model_dir)
    model = AutoModelForCausalLM.from_pretrained(cli.model_dir, dtype=torch.float32)

    def rows(path, n):
        with open(path) as f:
            return [{"input_ids": tokenizer(json.loads(line)["text"])["input_ids"]} for line in f][:n]

    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    train_loader = torch.utils.data.DataLoader(
        rows(cli.train_file, cli.rows), batch_size=cli.batch_size, collate_fn=collator
    )
    eval_loader = torch.utils.data.DataLoader(rows(cli.eval_file, 8), batch_size=3, collate_fn=collator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = len(train_loader) // cli.grad_accum
    # run_clm_no_trainer's schedule: accelerate steps a prepared scheduler num_processes times per optimizer step
    scheduler = get_scheduler(
        "linear",
        optimizer=optimizer,
        num_warmup_steps=1 * accelerator.num_processes,
        num_training_steps=steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    log = {"micro": [], "steps": []}
    model.train()
    for batch in train_loader:
        with accelerator.accumulate(model):
            outputs = model(**batch)
            loss = outputs.loss
            log["micro"].append({"local": loss.item(), "gathered": accelerator.gather(loss.detach()).mean().item()})
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                log["steps"].append({"grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0]})
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    model.eval()
    losses = []
    for batch in eval_loader:
        with torch.no_grad():
            outputs = model(**batch)
        losses.append(accelerator.gather_for_metrics(outputs.loss.repeat(3)))
    log["eval_loss"] = torch.mean(torch.cat(losses)).item()
    if accelerator.is_main_process:
        with open(cli.log_file, "w") as f:
            json.dump(log, f)
    # Free the DDP model while its process group is registered, then destroy the group (see train_clm.py).
    accelerator.free_memory()
    del model, optimizer, train_loader, eval_loader
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
