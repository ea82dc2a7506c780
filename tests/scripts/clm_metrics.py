"""A plain Hugging Face Trainer script that evaluates with metrics, in the manner of transformers'
examples/pytorch/language-modeling/run_clm.py: `preprocess_logits_for_metrics` takes the argmax, `compute_metrics`
shifts and scores next-token accuracy. It knows nothing about hf_seqpar; the tests launch it unmodified with and
without sequence parallelism and compare everything it writes to `--out_file` (rank 0):

- the Trainer's log history (losses, counts, rates, epoch) and the info lines it logs at train start;
- evaluate() with three preprocessings: per-token argmax (run_clm's), a position-dependent one (argmax of the
  logits shifted inside it), and none (compute_metrics gets the full logits); then once more with left padding;
- predict(): predictions and label ids as lists.

Metrics: run_clm's accuracy; an accuracy, a position-weighted accuracy and a checksum of the predictions made at
labelled tokens (with left padding the plain run also scores the prediction a pad token makes of the first real
token); checksums of the label ids and inputs that depend on every value and its place (shapes included), so a
shuffled, shifted or re-padded array cannot pass.
"""

import argparse
import gc
import json
import logging

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)


class TextRows(torch.utils.data.Dataset):
    def __init__(self, path, tokenizer, limit=None):
        with open(path) as f:
            texts = [json.loads(line)["text"] for line in f][:limit]
        self.rows = [tokenizer(text)["input_ids"] for text in texts]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index]}


def argmax_of_logits(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def argmax_of_shifted_logits(logits, labels):
    """Position-dependent: entry t is the prediction made at t, aligned with labels[t + 1]; one column shorter."""
    return logits[:, :-1].argmax(dim=-1)


def checksum(array):
    """Depends on each entry's value and place; -100 (padding between batches) counts too."""
    array = np.asarray(array, dtype=np.int64)
    weights = np.arange(1, array.size + 1, dtype=np.int64).reshape(array.shape) % 9973
    return float((array * weights).sum()) + 1e-3 * array.shape[0] + 1e-6 * array.shape[-1]


def make_compute_metrics(kind):
    def compute_metrics(eval_pred):
        preds, labels, inputs = eval_pred.predictions, eval_pred.label_ids, eval_pred.inputs
        if kind == "logits":
            preds = preds.argmax(-1)
        beyond_rows = inputs[:, : preds.shape[1]] == -100  # padding between processes and between batches
        beyond_checksum = checksum(np.where(beyond_rows, preds, -2))
        if kind != "shifted":  # run_clm: the prediction at t is for the label at t + 1
            preds = preds[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        valid = scored & (labels[:, :-1] != -100)  # predicted at a labelled token
        correct = (preds == targets) & valid
        weight = np.arange(1, targets.shape[1] + 1)[None, :] * valid  # later positions weigh more
        return {
            "accuracy": float(((preds == targets) & scored).sum() / scored.sum()),  # run_clm's
            "labelled_accuracy": float(correct.sum() / valid.sum()),
            "position_weighted_accuracy": float((correct * weight).sum() / weight.sum()),
            "labels_checksum": checksum(labels),
            "inputs_checksum": checksum(inputs),
            "preds_checksum": checksum(np.where(valid, preds, -1)),
            "beyond_rows_checksum": beyond_checksum,  # what the preprocessing makes of the -100 padding
        }

    return compute_metrics


class InfoLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--eval_file", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--out_file", required=True)
    parser.add_argument("--eval_rows", type=int, default=7)  # 7 rows, batches of 2: a last, partial batch
    parser.add_argument("--tokens_seen", default="non_padding")
    parser.add_argument("--model_init", action="store_true")
    cli = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(cli.model_dir)
    train = TextRows(cli.train_file, tokenizer)
    evaluation = TextRows(cli.eval_file, tokenizer, cli.eval_rows)

    def model_init():
        return AutoModelForCausalLM.from_pretrained(cli.model_dir, dtype=torch.float32)

    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=True,
        include_for_metrics=["inputs"],
        include_num_input_tokens_seen=cli.tokens_seen,
        log_level="info",
    )
    info = InfoLines()
    logging.getLogger("transformers.trainer").addHandler(info)
    trainer = Trainer(
        model=None if cli.model_init else model_init(),
        model_init=model_init if cli.model_init else None,
        args=args,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        train_dataset=train,
        eval_dataset=evaluation,
        compute_metrics=make_compute_metrics("argmax"),
        preprocess_logits_for_metrics=argmax_of_logits,
    )
    trainer.train()
    results = {"log_history": trainer.state.log_history, "evaluate": {}}
    for kind, preprocess in (("shifted", argmax_of_shifted_logits), ("logits", None)):
        trainer.compute_metrics = make_compute_metrics(kind)
        trainer.preprocess_logits_for_metrics = preprocess
        results["evaluate"][kind] = trainer.evaluate(metric_key_prefix=f"eval_{kind}")
    trainer.compute_metrics = make_compute_metrics("argmax")
    trainer.preprocess_logits_for_metrics = argmax_of_logits
    prediction = trainer.predict(evaluation)
    tokenizer.padding_side = "left"  # the collator pads through the tokenizer
    results["evaluate"]["left"] = trainer.evaluate(metric_key_prefix="eval_left")
    results["predict"] = {
        "metrics": prediction.metrics,
        "predictions": prediction.predictions.tolist(),
        "label_ids": prediction.label_ids.tolist(),
    }
    results["info_lines"] = [line for line in info.lines if "batch size" in line or "Num examples" in line]
    if trainer.is_world_process_zero():
        with open(cli.out_file, "w") as f:
            json.dump(results, f)
    trainer.accelerator.free_memory()  # see train_clm.py: free the DDP model before destroying the group
    del trainer
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
