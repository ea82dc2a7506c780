"""What compute_metrics, preprocess_logits_for_metrics, evaluate() and predict() receive under SP equals what they
receive without it: whole rows in the base batch's order, its own (unshifted) labels and padding, every sample once,
the last partial batch included (issue 8, point 1).

- In a 2-rank pool, a Trainer switched by `attach` and a plain Trainer evaluate the same model on the same rows, with
  left and right padding and a per-token, a position-dependent and no preprocessing: every metric, prediction, label
  and input equal, exactly.
- In a 4-rank pool (DP 2 x SP 2) the eval loop's gather counts each sample once and cuts the last batch as the plain
  DP 2 run does.
- The check that lets a preprocessing run on the shard accepts per-token functions and refuses the others.
The end-to-end launch of an unmodified run_clm-style script is in test_logs.py (it checks the logs of the same run).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ROWS = [[5 + (7 * i + 3 * j) % 50 for j in range(n)] for i, n in enumerate((9, 17, 4, 23, 12, 6, 15))]  # 7 rows


def _collate(features, padding_side):
    """Pad to the longest row on `padding_side`, like DataCollatorForLanguageModeling with a tokenizer."""
    longest = max(len(f["input_ids"]) for f in features)
    ids, mask = [], []
    for f in features:
        row, pad = f["input_ids"], [0] * (longest - len(f["input_ids"]))
        ids.append(pad + row if padding_side == "left" else row + pad)
        mask.append([0] * len(pad) + [1] * len(row) if padding_side == "left" else [1] * len(row) + [0] * len(pad))
    input_ids, attention_mask = torch.tensor(ids), torch.tensor(mask)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
    }


def argmax_of_logits(logits, labels):
    return logits.argmax(dim=-1)


def argmax_of_shifted_logits(logits, labels):  # position-dependent: one column shorter
    return logits[:, :-1].argmax(dim=-1)


def _metrics(kind):
    def compute_metrics(eval_pred):
        preds, labels, inputs = eval_pred.predictions, eval_pred.label_ids, eval_pred.inputs
        preds = preds.argmax(-1) if kind == "logits" else preds
        preds = preds if kind == "shifted" else preds[:, :-1]
        targets = labels[:, 1:]
        valid = (targets != -100) & (labels[:, :-1] != -100)  # predicted at a labelled token
        weight = np.arange(1, targets.shape[1] + 1)[None, :] * valid
        return {
            "accuracy": float(((preds == targets) & valid).sum() / valid.sum()),
            "position_weighted_accuracy": float((((preds == targets) & valid) * weight).sum() / weight.sum()),
            # exact arrays, compared by the test: predictions where they count, labels and inputs whole
            "preds": np.where(valid, preds, -1).tolist(),
            "labels": labels.tolist(),
            "inputs": inputs.tolist(),
        }

    return compute_metrics


def _body_trainer_eval_matches_plain(mode):
    import copy
    import functools

    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments

    from hf_seqpar import SeqParConfig
    from hf_seqpar.integrations.trainer import attach

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    args = TrainingArguments(
        output_dir=f"/tmp/hf_seqpar_eval_{dist.get_rank()}", per_device_eval_batch_size=2, use_cpu=True,
        report_to=[], include_for_metrics=["inputs"], disable_tqdm=True,
    )  # fmt: skip
    dataset = [{"input_ids": row} for row in ROWS]
    groups_cache: dict = {}
    results = {}
    for padding_side in ("right", "left"):
        collate = functools.partial(_collate, padding_side=padding_side)
        for kind, preprocess in (
            ("argmax", argmax_of_logits),
            ("shifted", argmax_of_shifted_logits),
            ("logits", None),
        ):
            got = {}
            for name in ("plain", "sp"):
                trainer = Trainer(
                    model=copy.deepcopy(model), args=args, data_collator=collate, eval_dataset=dataset,
                    compute_metrics=_metrics(kind), preprocess_logits_for_metrics=preprocess,
                )  # fmt: skip
                trainer.remove_callback(PrinterCallback)
                if name == "sp":
                    attach(trainer, SeqParConfig(sp_size=2, mode=mode), groups_cache)
                metrics = trainer.evaluate()
                prediction = trainer.predict(dataset)
                timing = ("loss", "second", "runtime", "time")  # the loss needs the world's count (see the test)
                metrics = {k: v for k, v in metrics.items() if not any(word in k for word in timing)}
                got[name] = (metrics, prediction.label_ids.tolist())
            results[padding_side, kind] = got
    return results


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_trainer_eval_and_predict_match_plain_run(ranks, mode):
    # The pool's Trainer runs as one process per rank (no launcher env), so the eval loss, which needs the world's
    # token count, is checked by the launch tests; everything compute_metrics and predict() see is checked here.
    for results in ranks.run(_body_trainer_eval_matches_plain, mode):
        for (padding_side, kind), got in results.items():
            assert got["sp"] == got["plain"], (padding_side, kind)
            assert len(got["plain"][0]["eval_labels"]) == len(ROWS)  # the last, partial batch is in


def _body_refusals_and_model_init():
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_seqpar import SeqParConfig
    from hf_seqpar.integrations.trainer import attach
    from hf_seqpar.integrations.transformers import STATE_ATTR

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    args = TrainingArguments(output_dir=f"/tmp/hf_seqpar_init_{dist.get_rank()}", use_cpu=True, report_to=[])
    sp, cache = SeqParConfig(sp_size=2, mode="ring"), {}
    refused = None
    trainer = Trainer(model=LlamaForCausalLM(config), args=args, compute_loss_func=lambda outputs, labels, **kw: 0)
    try:
        attach(trainer, sp, cache)
    except ValueError as error:
        refused = str(error)
    trainer = Trainer(model_init=lambda: LlamaForCausalLM(config), args=args)
    attach(trainer, sp, cache)
    recreated = trainer.call_model_init()  # what train() does when the Trainer has a model_init
    return refused, STATE_ATTR in vars(recreated), STATE_ATTR in vars(trainer.model)


def test_compute_loss_func_is_refused_and_model_init_is_switched(ranks):
    for refused, recreated_switched, first_switched in ranks.run(_body_refusals_and_model_init):
        assert refused is not None and refused.startswith("hf_seqpar: a custom compute_loss_func")
        assert recreated_switched and first_switched


def _body_dp_gather(remainder, end):
    import torch.distributed as dist

    from hf_seqpar import SeqParConfig, init_groups
    from hf_seqpar.integrations.evaluation import dp_gather_for_metrics

    groups = init_groups(SeqParConfig(sp_size=2, mode="ring"))
    state = type("GradientState", (), {"end_of_dataloader": end, "remainder": remainder})
    accelerator = type("Accelerator", (), {"gradient_state": state})
    gather = dp_gather_for_metrics(accelerator, groups)
    rows = torch.arange(3) + 10 * groups.dp_rank  # this DP rank's 3 samples, the same on its SP ranks
    assert dist.get_world_size() == 4
    return gather({"x": rows, "y": rows[:, None] * 2}), gather([int(v) for v in rows], use_gather_object=True)


@pytest.mark.parametrize("ranks", [4], indirect=True)
def test_eval_gather_counts_each_sample_once(ranks):
    # Plain DP 2 gathers [0, 1, 2] and [10, 11, 12]; at the end of the loader accelerate keeps the `remainder` first.
    for remainder, end, expected in ((5, True, [0, 1, 2, 10, 11]), (5, False, [0, 1, 2, 10, 11, 12])):
        for tensors, objects in ranks.run(_body_dp_gather, remainder, end):
            assert tensors["x"].tolist() == expected and tensors["y"][:, 0].tolist() == [2 * v for v in expected]
            assert objects == expected


@pytest.mark.parametrize(
    ("preprocess", "per_token"),
    [
        (lambda x, y: x.argmax(-1), True),
        (lambda x, y: torch.where(y != -100, x.argmax(-1), -100), True),  # per token, with the labels
        (lambda x, y: x.log_softmax(-1).max(-1).values, True),
        (lambda x, y: x[:, :-1].argmax(-1), False),  # shifted: one column shorter
        (lambda x, y: torch.roll(x.argmax(-1), -1, dims=1), False),  # shifted, same shape
        (lambda x, y: x.argmax(-1).cumsum(1), False),  # cumulative
        (lambda x, y: x.argmax(-1) + torch.arange(x.shape[1]), False),  # reads the position index
        (lambda x, y: (x - x.mean(1, keepdim=True)).argmax(-1), False),  # sequence-wide statistic
        (lambda x, y: (x, x), False),  # not a tensor
    ],
)
def test_per_token_check_of_preprocess_logits(preprocess, per_token):
    from hf_seqpar.integrations.evaluation import _is_per_token

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 40, 64), torch.randint(0, 64, (2, 40))
    labels[:, :5] = -100
    preds = preprocess(logits, labels)
    assert _is_per_token(preprocess, logits, labels, preds, torch.Generator().manual_seed(0)) is per_token
