"""TRL under sequence parallelism: DPO and KTO equal the plain run, every other TRL trainer is refused at construction.

The end-to-end runs are TRL's own scripts (trl/scripts/dpo.py, kto.py, reward.py, ...) on the tiny Llama of
tests/scripts/make_tiny_assets.py, started by `hf-seqpar launch` on 2 (or 4) CPU processes and compared with the same
script run plainly (one process, or torchrun without hf_seqpar for data parallelism). Float32 on CPU, as TRL falls
back to without bf16 hardware; LoRA runs with lora_dropout=0 (dropout draws per-rank masks, not exact by design).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hf_seqpar import SeqParConfig

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
RTOL = 1e-4  # float32 sums of shard partials in another order than the plain run (observed: <= 6e-7)
# Rewards (beta * (logp - logp_ref)) and KTO's kl are differences of two ~50-nat float32 sums: their error is that
# of the sums, absolute (ulp(50) = 4e-6; observed <= 2e-6), not relative to the difference, which starts at 0.
DIFFERENCE_ATOL = 1e-5
COMMON = (
    "--per_device_train_batch_size 2 --per_device_eval_batch_size 2 --gradient_accumulation_steps 2 "
    "--learning_rate 5 --optim sgd --lr_scheduler_type constant --logging_steps 1 --eval_strategy steps "
    "--save_strategy steps --seed 0 --use_cpu --bf16 False --dtype float32 --report_to none "
    "--dataloader_num_workers 0 --disable_tqdm True"
).split()
LORA = "--use_peft --lora_r 8 --lora_alpha 16 --lora_dropout 0".split()
COMPARED = (
    "loss",
    "grad_norm",
    "entropy",
    "num_tokens",
    "mean_token_accuracy",
    "kl",
    "epoch",
    "num_input_tokens_seen",
)
COMPARED_PREFIXES = ("rewards/", "logps/", "logits/")


# ---- assets and runners ------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="session")
def trl_assets(tmp_path_factory):
    """The tiny Llama and tokenizer, plus preference, unpaired-preference and prompt-only data built from its words."""
    import random

    build = runpy.run_path(str(ROOT / "tests" / "scripts" / "make_tiny_assets.py"))["build"]
    root = build(tmp_path_factory.mktemp("trl"))
    rng = random.Random(1)
    words = [f"w{i}" for i in range(60)]

    def text(low, high):
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    for split, n in (("train", 32), ("test", 8)):
        pairs = [{"prompt": text(3, 12), "chosen": " " + text(2, 20), "rejected": " " + text(2, 20)} for _ in range(n)]
        _write_jsonl(root / "preference" / f"{split}.jsonl", pairs)
        unpaired = [
            {
                "prompt": p["prompt"],
                "completion": p["chosen" if i % 2 else "rejected"],
                "label": i % 2 == 1 or i % 3 == 0,
            }
            for i, p in enumerate(pairs)
        ]
        _write_jsonl(root / "unpaired" / f"{split}.jsonl", unpaired)
        _write_jsonl(root / "prompts" / f"{split}.jsonl", [{"prompt": p["prompt"]} for p in pairs])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "cache"),
        "TOKENIZERS_PARALLELISM": "0",
    }
    env = {k: v for k, v in env.items() if not k.startswith("HF_SEQPAR_")}
    return SimpleNamespace(root=root, model=root / "model", env=env)


def _run(cmd: list, assets, cwd: Path, check: bool = True, **env) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env={**assets.env, **env}, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if check:
        assert done.returncode == 0, f"{cmd}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
    return done


def _hf_seqpar_cli() -> list:
    script = shutil.which("hf-seqpar", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from hf_seqpar.__main__ import cli; cli()"]


def _launch_sp(assets, work: Path, processes: int, section: dict, script_cmd: list, check: bool = True):
    work.mkdir(parents=True, exist_ok=True)
    config = work / "accelerate.yaml"
    cluster = {"distributed_type": "MULTI_CPU", "use_cpu": True, "num_machines": 1, "num_processes": processes}
    config.write_text(yaml.safe_dump({**cluster, "hf_seqpar": section}))
    return _run([*_hf_seqpar_cli(), "launch", "--config_file", config, *script_cmd], assets, work, check=check)


def script_cmd(assets, script: str, data: str, out: Path, *extra) -> list:
    """TRL's own `trl/scripts/<script>.py` on the tiny model and a local JSON-lines data directory."""
    path = Path(__import__(f"trl.scripts.{script}", fromlist=["main"]).__file__)
    return [
        path,
        "--model_name_or_path",
        assets.model,
        "--dataset_name",
        assets.root / data,
        "--output_dir",
        out,
        *extra,
    ]


def trl_state(out: Path, last_step: int) -> dict:
    return json.loads((out / f"checkpoint-{last_step}" / "trainer_state.json").read_text())


def trl_log(out: Path, last_step: int) -> list[dict]:
    return trl_state(out, last_step)["log_history"]


def worst_differences(got: list[dict], want: list[dict]) -> dict[str, float]:
    """Per metric (train and eval_), the worst |got - want| / |want| over the logged rows; asserts within tolerance."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst, bad = {}, []
    for row, ref in zip(got, want, strict=True):
        for key, value in ref.items():
            name = key.removeprefix("eval_")
            if name not in COMPARED and not name.startswith(COMPARED_PREFIXES):
                continue
            diff = abs(row[key] - value)
            atol = DIFFERENCE_ATOL if name == "kl" or name.startswith("rewards/") and "accuracies" not in name else 0
            if diff > RTOL * abs(value) + atol:
                bad.append((row["step"], key, row[key], value))
            worst[key] = max(worst.get(key, 0.0), diff / abs(value) if value else diff)
    assert bad == [], f"(step, key, got, plain) beyond rtol={RTOL}: {bad}"
    return worst


def assert_same_curve(got: list[dict], want: list[dict], steps: int) -> None:
    keys = {k for row in want for k in row}
    assert {"loss", "grad_norm", "rewards/chosen", "rewards/accuracies", "logps/rejected", "eval_loss"} <= keys or (
        {"loss", "grad_norm", "kl", "eval_loss"} <= keys
    )
    assert len([r for r in want if "loss" in r]) == steps
    worst_differences(got, want)


# ---- which trainers run, which are refused (in this process) -----------------------------------------------------


def _bare(cls):
    return object.__new__(cls)  # the check reads the class only: no model, no data


def test_trl_trainers_are_exact_or_refused_by_name():
    import trl
    from transformers import Trainer

    from hf_seqpar.integrations.trl import GENERIC, WHOLE_SEQUENCES, check_trl_trainer

    assert check_trl_trainer(_bare(trl.SFTTrainer)) == GENERIC
    assert check_trl_trainer(_bare(trl.DPOTrainer)) == check_trl_trainer(_bare(trl.KTOTrainer)) == WHOLE_SEQUENCES
    assert check_trl_trainer(_bare(Trainer)) is None

    class MyDPOTrainer(trl.DPOTrainer):  # a user's subclass runs as the TRL class it extends
        pass

    assert check_trl_trainer(_bare(MyDPOTrainer)) == WHOLE_SEQUENCES
    stable = [name for name in dir(trl) if name.endswith("Trainer")]
    refused = sorted(set(stable) - {"SFTTrainer", "DPOTrainer", "KTOTrainer"})
    assert refused == ["DistillationTrainer", "GRPOTrainer", "RLOOTrainer", "RewardTrainer"]
    for name in refused:
        with pytest.raises(NotImplementedError, match=rf"^hf_seqpar: {name} \(trl\.trainer\..*\) is not supported .*"):
            check_trl_trainer(_bare(getattr(trl, name)))


def test_experimental_trl_trainers_are_refused():
    import importlib
    import pkgutil

    import trl.experimental

    from hf_seqpar.integrations.trl import WHOLE_SEQUENCES, check_trl_trainer

    found = {}
    for info in pkgutil.iter_modules(trl.experimental.__path__):
        try:
            module = importlib.import_module(f"trl.experimental.{info.name}")
        except ImportError:  # an optional dependency of that trainer is not installed
            continue
        for name in dir(module):
            cls = getattr(module, name)
            if isinstance(cls, type) and name.endswith("Trainer") and cls.__module__.startswith("trl.experimental"):
                found[f"{cls.__module__}.{name}"] = cls
    assert len(found) >= 5  # GKD, ORPO, CPO, online DPO, ... (what imports without optional dependencies)
    for path, cls in found.items():
        if path == "trl.experimental.kto.KTOTrainer":  # the deprecated import path of trl.KTOTrainer
            assert check_trl_trainer(_bare(cls)) == WHOLE_SEQUENCES
            continue
        with pytest.raises(NotImplementedError, match=r"^hf_seqpar: \w+ \(trl\.experimental\..*Run it without"):
            check_trl_trainer(_bare(cls))


def test_shard_rows_keeps_every_token_in_place():
    from hf_seqpar import layout
    from hf_seqpar.integrations.trl import shard_rows

    # rows: right padding, left padding, both sides, none; S=7 padded to S_pad=8 for zigzag over 2 ranks
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0], [1] * 7])
    input_ids = torch.arange(28).view(4, 7) + 1
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # the first real token of a left-padded row is predicted by padding: TRL masks prompts
    labels[1, 2] = labels[2, 1] = -100
    placement = layout.Placement.build(8, 2, "zigzag")
    shards = [shard_rows(input_ids, mask, labels, placement, rank) for rank in range(2)]

    def whole(key):
        return layout.unshard([s[key] for s in shards], placement, dim=1)

    assert torch.equal(whole("input_ids")[:, :7], input_ids)  # in place: nothing rolled
    assert torch.equal(whole("position_ids"), torch.arange(8).expand(4, 8))  # as the plain forward's positions
    want_shift = torch.cat([labels[:, 1:], torch.full((4, 2), -100)], 1)
    assert torch.equal(whole("shift_labels"), want_shift)
    docs = shards[0]["seqpar_cu_seqlens"]  # host-side DocumentOffsets: attention reads them with no device sync
    assert shards[1]["seqpar_cu_seqlens"] == docs
    assert docs.rows == ((0, 4, 8), (0, 2, 7, 8), (0, 1, 5, 8), (0, 7, 8))

    with pytest.raises(NotImplementedError, match="padding between real tokens"):
        shard_rows(input_ids, torch.tensor([[1, 0, 1, 1, 1, 1, 1]] * 4), labels, placement, 0)
    unmasked = labels.clone()
    unmasked[0, 5] = 3  # a label on padding: the plain run scores it from a padding query the shard cannot match
    with pytest.raises(NotImplementedError, match="label is set where padding predicts"):
        shard_rows(input_ids, mask, unmasked, placement, 0)


def test_fused_forward_refuses_what_it_cannot_split():
    from hf_seqpar.integrations.trl import sharded_fused_forward

    forward = sharded_fused_forward(lambda **kwargs: None, None, "TinyLM")  # refusals come before any state is read
    ids = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="^hf_seqpar: TinyLM was called for logits"):
        forward(input_ids=ids)  # return_outputs / compute_metrics / predict: whole-vocabulary logits
    with pytest.raises(NotImplementedError, match=r"got \['output_router_logits', 'pixel_values'\]"):
        forward(input_ids=ids, labels=ids, fused_lm_head=True, pixel_values=torch.ones(1), output_router_logits=True)
    with pytest.raises(NotImplementedError, match=r"got \['use_cache=True'\]"):
        forward(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=True)


# ---- on 2 ranks (pool): the Trainer hook refuses, the fused forward matches the plain one ------------------------


def _body_attach_refuses(names: list[str]) -> dict:
    """`attach`, as the hooked `Trainer.__init__` calls it, on each TRL trainer class: the message it raises."""
    import trl

    from hf_seqpar.integrations.trainer import attach

    messages = {}
    for name in names:
        trainer = _bare(getattr(trl, name))
        trainer.model = torch.nn.Module()  # a placeholder: the refusal reads the class only
        try:
            attach(trainer, SeqParConfig(sp_size=2, mode="ring"), {})
        except NotImplementedError as refusal:
            messages[name] = str(refusal)
    return messages


def test_trainer_hook_refuses_the_other_trl_trainers(ranks):
    names = ["DistillationTrainer", "GRPOTrainer", "RLOOTrainer", "RewardTrainer"]
    for messages in ranks.run(_body_attach_refuses, names):
        assert sorted(messages) == names
        for name, message in messages.items():
            assert message.startswith(f"hf_seqpar: {name} (trl.trainer.") and "Run it without sequence par" in message


def _body_fused_forward(mode: str):
    """A DPO-style loss from the wrapped fused forward on 2 ranks vs the plain fused forward of the same model: the
    per-token outputs, and the gradients once averaged over the world as DDP averages them."""
    import copy

    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from hf_seqpar.integrations.transformers import apply_sequence_parallel
    from hf_seqpar.integrations.trl import WholeSequenceState, sharded_fused_forward
    from hf_seqpar.mesh import init_groups

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    plain = copy.deepcopy(model)
    for m in (model, plain):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    config = SeqParConfig(sp_size=2, mode=mode)
    groups = init_groups(config)
    apply_sequence_parallel(model, config=config, groups=groups)
    state = WholeSequenceState(config=config, groups=groups)
    model.forward = sharded_fused_forward(model.forward, state, "LlamaForCausalLM")

    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 50, (4, 13), generator=gen)
    mask = torch.ones(4, 13, dtype=torch.long)
    mask[0, 9:] = mask[1, :3] = mask[2, 11:] = 0  # right, left and right padding
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the prompt

    def loss_of(m):
        out = m(input_ids=input_ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        chosen, rejected = out.log_probs.sum(1).chunk(2)
        return -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean(), out

    loss, out = loss_of(model)
    loss.backward()
    plain_loss, plain_out = loss_of(plain)
    plain_loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    dist.all_reduce(grads)
    grads /= dist.get_world_size()  # DDP's average over the world
    plain_grads = torch.cat([p.grad.flatten() for p in plain.parameters()])
    return {
        "log_probs": (out.log_probs - plain_out.log_probs).abs().max().item(),
        "entropy": (out.entropy - plain_out.entropy).abs().max().item(),
        "is_top1": torch.equal(out.is_top1, plain_out.is_top1),
        "shape": tuple(out.log_probs.shape) == tuple(plain_out.log_probs.shape),
        "loss": abs(loss.item() - plain_loss.item()),
        "grads": ((grads - plain_grads).abs().max() / plain_grads.abs().max()).item(),
    }


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_sharded_fused_forward_matches_plain_outputs_and_gradients(ranks, mode):
    for result in ranks.run(_body_fused_forward, mode):
        assert result["shape"] and result["is_top1"]
        # float32 (TRL's fused head projects in float32 whatever the model's dtype): summation order only, a few ulps
        # of values of a few nats (observed <= 5e-7); without the gather's sp_size factor the gradients would be halved
        assert result["log_probs"] < 1e-5 and result["entropy"] < 1e-5 and result["loss"] < 1e-6
        assert result["grads"] < 1e-5  # relative to the largest gradient (observed <= 1.2e-7)


# ---- TRL's scripts, launched ---------------------------------------------------------------------------------------


FAST_DPO = [*COMMON, *LORA, "--max_length", "64", "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2"]
FAST_DPO += ["--include_num_input_tokens_seen", "True"]  # counted as "all"


@pytest.fixture(scope="session")
def plain_dpo_lora(trl_assets):
    out = trl_assets.root / "plain_dpo_lora"
    _run([sys.executable, *script_cmd(trl_assets, "dpo", "preference", out, *FAST_DPO)], trl_assets, out)
    return trl_state(out, 2)


def test_trl_dpo_script_with_lora_matches_plain_run(trl_assets, plain_dpo_lora):
    """TRL's dpo.py with LoRA in float32, the run that crashed before (DDP got `labels` twice)."""
    out = trl_assets.root / "sp_dpo_lora"
    done = _launch_sp(trl_assets, out.with_name("sp_dpo_lora_launch"), 2, {"sp_size": 2, "mode": "ring"},
                      script_cmd(trl_assets, "dpo", "preference", out, *FAST_DPO))  # fmt: skip
    assert "hf_seqpar: world 2 = DP 1 x SP 2 (ulysses 1 x ring 2), mode ring" in done.stdout
    got = trl_state(out, 2)
    assert_same_curve(got["log_history"], plain_dpo_lora["log_history"], steps=2)
    assert (
        got["log_history"][-1]["num_input_tokens_seen"] == plain_dpo_lora["log_history"][-1]["num_input_tokens_seen"]
    )
    assert got["total_flos"] == plain_dpo_lora["total_flos"]  # counted once per data-parallel rank, not per SP rank


@pytest.mark.slow
def test_trl_reward_script_is_refused_at_construction_slow(trl_assets):
    out = trl_assets.root / "sp_reward"
    cmd = script_cmd(trl_assets, "reward", "preference", out, *COMMON, "--max_steps", "1")
    done = _launch_sp(trl_assets, out, 2, {"sp_size": 2}, cmd, check=False)
    assert done.returncode != 0
    refusal = "NotImplementedError: hf_seqpar: RewardTrainer (trl.trainer.reward_trainer.RewardTrainer) is not "
    assert refusal in done.stderr and "Run it without sequence parallelism" in done.stderr, done.stderr[-3000:]


# ---- slow: the rest of the matrix --------------------------------------------------------------------------------

SLOW_RUNS = {  # name: (script, data, launch processes, section, extra args, plain launcher)
    "dpo-full-ulysses": ("dpo", "preference", 2, {"sp_size": 2, "mode": "ulysses"}, ["--learning_rate", "0.5"], 1),
    "dpo-lora-precompute-dp2": (
        "dpo", "preference", 4, {"sp_size": 2, "mode": "ring"},
        [*LORA, "--precompute_ref_log_probs", "True", "--precompute_ref_batch_size", "3",
         "--per_device_eval_batch_size", "3"], 2,
    ),
    "kto-lora-ring": ("kto", "unpaired", 2, {"sp_size": 2, "mode": "ring"}, LORA, 1),
    "kto-full-ulysses": ("kto", "unpaired", 2, {"sp_size": 2, "mode": "ulysses"}, ["--learning_rate", "0.5"], 1),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_RUNS)
def test_trl_script_matches_plain_run_slow(trl_assets, name):
    script, data, processes, section, extra, plain_processes = SLOW_RUNS[name]
    args = [*COMMON, "--max_length", "64", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "4", *extra]
    plain, sp = trl_assets.root / f"slow_plain_{name}", trl_assets.root / f"slow_sp_{name}"
    plain_cmd = script_cmd(trl_assets, script, data, plain, *args)
    if plain_processes == 1:
        _run([sys.executable, *plain_cmd], trl_assets, plain)
    else:  # data parallelism without hf_seqpar: torchrun on the script itself
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", plain_processes]
        _run([*torchrun, *plain_cmd], trl_assets, plain, ACCELERATE_USE_CPU="1")
    _launch_sp(
        trl_assets,
        sp.with_name(sp.name + "_launch"),
        processes,
        section,
        script_cmd(trl_assets, script, data, sp, *args),
    )
    got, want = trl_log(sp, 4), trl_log(plain, 4)
    if "precompute" in name:
        # policy == reference at step 1 (LoRA starts at zero), but the reference log-probs were precomputed with
        # another batch shape: the step-1 rewards are float32 noise (~1e-7) whose signs decide the accuracy
        got, want = ([{k: v for k, v in r.items() if not (r["step"] == 1 and "accuracies" in k)} for r in rows]
                     for rows in (got, want))  # fmt: skip
    assert_same_curve(got, want, steps=4)


@pytest.mark.slow
def test_trl_dpo_script_with_its_own_bf16_default_matches_plain_run_slow(trl_assets):
    """dpo.py as users run it: bf16=True autocast (CPU autocast here). SP must agree with the plain bf16 run within a
    small multiple of what bf16 itself changes (plain bf16 vs plain float32). Rewards and accuracies are not compared:
    they are differences of log-prob sums that bf16 moves by more than the rewards themselves at these step sizes."""
    args = [*COMMON, *LORA, "--max_length", "64", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "4"]
    logs = {}
    for name, bf16 in (("fp32", "False"), ("plain", "True"), ("sp", "True")):
        out = trl_assets.root / f"bf16_dpo_{name}"
        cmd = script_cmd(trl_assets, "dpo", "preference", out, *args, "--bf16", bf16)  # the last --bf16 wins
        if name == "sp":
            _launch_sp(trl_assets, out.with_name(out.name + "_launch"), 2, {"sp_size": 2, "mode": "ring"}, cmd)
        else:
            _run([sys.executable, *cmd], trl_assets, out)
        logs[name] = trl_log(out, 4)
    for sp, plain, ref in zip(logs["sp"], logs["plain"], logs["fp32"], strict=True):
        for key in [
            k for k in plain if k.removeprefix("eval_") in ("loss", "grad_norm", "logps/chosen", "logps/rejected")
        ]:
            bf16_effect = abs(plain[key] - ref[key]) / abs(ref[key])
            # 4x what bf16 itself changes, floored at one bf16 rounding (2**-8)
            assert abs(sp[key] - plain[key]) / abs(plain[key]) <= 4 * max(bf16_effect, 2**-8), (key, sp, plain)


REFUSED_SCRIPTS = {  # script: (data, extra args, trainer)
    "grpo": ("prompts", ["--reward_funcs", "think_format_reward", "--num_generations", "2",
                         "--max_completion_length", "8"], "GRPOTrainer"),
    "rloo": ("prompts", ["--reward_funcs", "think_format_reward", "--num_generations", "2",
                         "--max_completion_length", "8"], "RLOOTrainer"),
    "distillation": ("prompts", ["--teacher_model_name_or_path", "{model}", "--max_completion_length", "8"],
                     "DistillationTrainer"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("script", REFUSED_SCRIPTS)
def test_trl_script_is_refused_at_construction_slow(trl_assets, script):
    data, extra, trainer = REFUSED_SCRIPTS[script]
    extra = [str(a).format(model=trl_assets.model) for a in extra]
    out = trl_assets.root / f"sp_refused_{script}"
    cmd = script_cmd(trl_assets, script, data, out, *COMMON, "--max_steps", "1", *extra)
    done = _launch_sp(trl_assets, out, 2, {"sp_size": 2}, cmd, check=False)
    assert done.returncode != 0
    assert f"NotImplementedError: hf_seqpar: {trainer} (trl.trainer." in done.stderr, done.stderr[-3000:]
