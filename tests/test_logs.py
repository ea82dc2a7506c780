"""An unmodified run_clm-style Trainer script (tests/scripts/clm_metrics.py: gradient checkpointing, compute_metrics
with preprocess_logits_for_metrics, include_for_metrics=["inputs"], include_num_input_tokens_seen, a last partial
eval batch, evaluate() and predict()) launched on 2 processes with SP against the plain single-process run
(issue 8, points 1 and 4):

- every number it logs equals the plain run's: losses and grad_norm to float rounding, counts exactly (epoch,
  num_input_tokens_seen, total_flos, the "Total train batch size" line), rates as the count they imply (rate x
  runtime: the run times differ, the counts must not);
- every metric of evaluate() and predict() equals the plain run's, exactly (per-token, position-dependent and no
  preprocessing; right and left padding); predictions and label ids too.
The SP run builds its model with `model_init`, which the Trainer calls again in train(): that model must be switched.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import test_launch
from test_launch import ROOT, RTOL, _run, launch_sp

assets = test_launch.assets  # the launch tests' fixture: tiny model, tokenizer and data

SCRIPT = ROOT / "tests" / "scripts" / "clm_metrics.py"
RATE_RTOL = 1e-2  # rate x runtime, each rounded by the Trainer (3 and 4 decimals) over runs of ~0.1 s
# With left padding the plain run also scores the first real token as predicted by the last pad token (its query
# sees only masked keys); SP rolls the padding to the right, where that target does not exist. The loss and
# run_clm's accuracy therefore differ on the left-padded eval; the labelled-token metrics must not.
LEFT_PADDING_ONLY_PLAIN = ("eval_left_loss", "eval_left_accuracy")
FLOAT_KEYS = ("loss", "grad_norm", "train_loss")


def _cmd(assets, out, *extra) -> list:
    data = ["--train_file", assets.data / "train.jsonl", "--eval_file", assets.data / "test.jsonl"]
    return [SCRIPT, "--model_dir", assets.model, *data, "--output_dir", out, "--out_file", out / "result.json", *extra]


@pytest.fixture(scope="module")
def plain_result(assets):
    out = assets.root / "logs_plain"
    _run([sys.executable, *_cmd(assets, out)], assets, out)
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def sp_result(assets):
    out = assets.root / "logs_sp"
    launch_sp(assets, "logs_sp_launch", 2, {"sp_size": 2, "mode": "ring"}, _cmd(assets, out, "--model_init"))
    return json.loads((out / "result.json").read_text())


def _differences(got: dict, want: dict) -> list:
    """(key, got, plain) for every logged number that differs beyond what its kind allows."""
    bad = [(key, got.get(key), want.get(key)) for key in set(got) ^ set(want)]
    for key in set(got) & set(want):
        value, ref = got[key], want[key]
        if key.endswith(("_runtime", "_time")) or key in LEFT_PADDING_ONLY_PLAIN:
            continue
        if key.endswith("_per_second"):  # compare the count it implies
            runtime = key.rsplit("_", 3)[0] + "_runtime"
            value, ref = value * got[runtime], ref * want[runtime]
            if abs(value - ref) > RATE_RTOL * abs(ref):
                bad.append((key + " x runtime", value, ref))
        elif key.endswith(FLOAT_KEYS):
            if abs(value - ref) > RTOL * abs(ref):
                bad.append((key, value, ref))
        elif value != ref:  # counts, epoch, learning rate, metrics: exact
            bad.append((key, value, ref))
    return bad


def test_every_logged_number_matches_plain_run(sp_result, plain_result):
    got, want = sp_result["log_history"], plain_result["log_history"]
    assert [row["step"] for row in got] == [row["step"] for row in want]
    bad = [(row["step"], *d) for row, ref in zip(got, want, strict=True) for d in _differences(row, ref)]
    assert bad == [], f"(step, key, SP, plain): {bad}"
    assert sp_result["info_lines"] == plain_result["info_lines"]  # "Total train batch size ... = 4" included
    assert any("Total train batch size" in line for line in plain_result["info_lines"])
    logged = {key for row in want for key in row}  # the numbers the Trainer derives from the world and the batches
    assert logged >= {"num_input_tokens_seen", "total_flos", "epoch", "train_samples_per_second"}
    assert logged >= {"train_tokens_per_second", "eval_steps_per_second", "eval_left_steps_per_second"}


def test_evaluate_and_predict_metrics_match_plain_run(sp_result, plain_result):
    for kind, metrics in plain_result["evaluate"].items():
        assert _differences(sp_result["evaluate"][kind], metrics) == [], kind
        assert any(k.endswith("position_weighted_accuracy") for k in metrics)
    got, want = sp_result["predict"], plain_result["predict"]
    assert _differences(got["metrics"], want["metrics"]) == []
    assert got["label_ids"] == want["label_ids"]  # the base batch's own labels, padding and last batch included
    labels, preds, plain_preds = (np.array(a) for a in (want["label_ids"], got["predictions"], want["predictions"]))
    assert preds.shape == plain_preds.shape == labels.shape and labels.shape[0] == 7
    scored = labels[:, 1:] != -100  # predictions at padding are not the model's to match
    assert (preds[:, :-1][scored] == plain_preds[:, :-1][scored]).all()


@pytest.mark.slow
def test_dp2_sp2_logs_and_metrics_match_plain_dp2(assets):
    """DP 2 x SP 2 (4 processes) against plain DP 2 (torchrun on the script itself): each eval sample counted once,
    the last batch cut where the plain run cuts it, per-token preprocessing padded to the longest row of the world."""
    plain, sp = assets.root / "logs_plain_dp2", assets.root / "logs_sp_dp2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, *_cmd(assets, plain)], assets, plain, ACCELERATE_USE_CPU="1")
    launch_sp(assets, "logs_sp_dp2_launch", 4, {"sp_size": 2, "mode": "ring"}, _cmd(assets, sp))
    got, want = (json.loads((out / "result.json").read_text()) for out in (sp, plain))
    test_every_logged_number_matches_plain_run(got, want)
    test_evaluate_and_predict_metrics_match_plain_run(got, want)


def _body_tokens_seen(mode: str, with_mask: bool):
    from types import SimpleNamespace

    import torch
    from transformers import Trainer

    from hf_seqpar import SeqParConfig, SequenceShardingCollator, init_groups
    from hf_seqpar.integrations.evaluation import EvalState
    from hf_seqpar.integrations.logs import plain_tokens

    config = SeqParConfig(sp_size=2, mode="ring")
    groups = init_groups(config)
    ids = torch.tensor([[5, 6, 0, 7, 8], [0, 0, 9, 3, 4]])  # 0 is the pad id; 5 tokens, padded to 8 by the layout
    base = {"input_ids": ids}
    if with_mask:
        base["attention_mask"] = (torch.arange(5) >= torch.tensor([[0], [2]])).long()  # row 1: left padding
    collator = SequenceShardingCollator(lambda f: dict(base), config=config, groups=groups, keep_unsharded=True)

    def trainer():
        return SimpleNamespace(
            args=SimpleNamespace(include_num_input_tokens_seen=mode, device=torch.device("cpu")),
            model=SimpleNamespace(main_input_name="input_ids"),
            processing_class=SimpleNamespace(pad_token_id=0),
            accelerator=SimpleNamespace(gather=lambda t: t),  # the plain run: one process
            state=SimpleNamespace(num_input_tokens_seen=0),
        )

    plain, sp = trainer(), trainer()
    Trainer._track_num_input_tokens(plain, dict(base))  # upstream's own count on the plain batch
    plain_tokens(sp, EvalState(config=config, groups=groups), None)(collator([]))
    return plain.state.num_input_tokens_seen, sp.state.num_input_tokens_seen


@pytest.mark.parametrize(
    ("mode", "with_mask", "expected"),
    [("all", False, 10), ("non_padding", False, 7), ("non_padding", True, 8)],  # numel; ids != pad; mask.sum()
)
def test_num_input_tokens_seen_counts_the_plain_batch(ranks, mode, with_mask, expected):
    # The layout pads each row to 8 with tokens that are not the pad id: neither they nor the rolled padding count.
    assert ranks.run(_body_tokens_seen, mode, with_mask) == [(expected, expected)] * 2
