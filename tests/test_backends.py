"""Sharded training backends under sequence parallelism, on 2 CPU processes: DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, each
full and with LoRA, launched with `hf-seqpar launch` on an unmodified Trainer script (tests/scripts/train_sharded.py).

The reference is the plain single-process run of the same script: no SP, no sharding backend, no hf_seqpar. SP=2 on
2 processes is DP=1, so both runs read the same batches in the same order, and ZeRO / FSDP change where the optimizer
step is computed, not what it computes: losses, gradient norms, eval losses and the final weights must agree to
float32 rounding. (The same backend without SP on 2 processes is DP=2, which splits each step's rows over the ranks
differently: another curve, not a reference. DDP x SP is covered by test_launch.py.)

Each run also proves that it was sharded (a backend that fell back to DDP would pass every comparison): the script
reports, per rank, what the backend made of each parameter and of the optimizer state. FSDP on CPU needs the
test-only shim in tests/cpu_shims (accelerate silently turns FSDP into DDP there); the same shim skips DeepSpeed's
JIT build of an inference-only op, and one slow test runs stock DeepSpeed without it.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_sharded.py"
SHIMS = ROOT / "tests" / "cpu_shims"
TIMEOUT_S = 300
STEPS, LR = 4, 1e-2  # the script's max_steps and learning_rate
RTOL = 1e-5  # logged values: float32 sums of shard partials in another order (observed: <= 2e-6)
# Final weights: Adam divides each gradient element by its own RMS, so a rounding difference in a near-zero element
# can move that element's update by a fraction of lr. Allow 1e-3 of the largest possible total update (observed 9e-6).
WEIGHT_ATOL = 1e-3 * LR * STEPS

ZERO3_JSON = {  # persistence threshold 0: every parameter, norms included, is released between uses
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,  # else save_model writes no adapter / model file
    },
    **{key: "auto" for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")},
    "gradient_clipping": "auto",
}
BACKENDS = {  # accelerate config without the hf_seqpar section; CPU, as a user would write it
    "zero2": {
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"zero_stage": 2, "offload_optimizer_device": "none", "offload_param_device": "none"},
    },
    "zero3": {  # zero3_init_flag: the script builds TrainingArguments first, so the model is partitioned as it loads
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": "zero3.json", "zero3_init_flag": True},
    },
    "fsdp2": {
        "distributed_type": "FSDP",
        "mixed_precision": "no",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",  # save_model writes the model / adapter file
        },
    },
}
BACKENDS["fsdp2-sharded-checkpoints"] = {  # as accelerate_configs/fsdp2_sp.yaml: DCP checkpoints, no final file
    **BACKENDS["fsdp2"],
    "fsdp_config": {**BACKENDS["fsdp2"]["fsdp_config"], "fsdp_state_dict_type": "SHARDED_STATE_DICT"},
}
MODES = {"zero2": "ulysses", "zero3": "ring", "fsdp2": "ulysses", "fsdp2-sharded-checkpoints": "ring"}
slow = pytest.mark.slow
MATRIX = [  # (backend, lora); one ZeRO-3 and one FSDP2 run in the default suite, the rest behind the slow marker
    ("zero3", False),
    ("fsdp2", False),
    pytest.param("zero2", False, marks=slow),
    pytest.param("zero2", True, marks=slow),
    pytest.param("zero3", True, marks=slow),
    pytest.param("fsdp2", True, marks=slow),
]


# ---- runs ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    build = runpy.run_path(str(ROOT / "tests" / "scripts" / "make_tiny_assets.py"))["build"]
    root = build(tmp_path_factory.mktemp("backends"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_SEQPAR_", "ACCELERATE_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="0", HF_DATASETS_CACHE=str(root / "cache"))
    return SimpleNamespace(root=root, env=env, runs={})


def _run(cmd: list, assets, cwd: Path, shims: bool = True) -> str:
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(assets.env)
    if shims:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIMS), env.get("PYTHONPATH")]))
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{cmd}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
    return done.stdout


def _script_cmd(assets, out: Path, lora: bool, *extra) -> list:
    data = assets.root / "data"
    cmd = [SCRIPT, "--model_dir", assets.root / "model", "--train_file", data / "train.jsonl"]
    cmd += ["--eval_file", data / "test.jsonl", "--output_dir", out, "--log_file", out / "log.json"]
    cmd += ["--shard_report_dir", out, *(["--lora", "--gradient_checkpointing"] if lora else []), *extra]
    return cmd


def _result(out: Path, lora: bool) -> SimpleNamespace:
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    weights = out / "final" / ("adapter_model.safetensors" if lora else "model.safetensors")
    return SimpleNamespace(out=out, log=json.loads((out / "log.json").read_text()), reports=reports, weights=weights)


def plain_run(assets, lora: bool) -> SimpleNamespace:
    """The script alone, one process (cached per session)."""
    key = ("plain", lora)
    if key not in assets.runs:
        out = assets.root / f"plain_lora{lora}"
        _run([sys.executable, *_script_cmd(assets, out, lora)], assets, out, shims=False)
        assets.runs[key] = _result(out, lora)
    return assets.runs[key]


def _launch(assets, name: str, backend: str, cmd: list, shims: bool = True) -> str:
    work = assets.root / f"{name}_launch"
    work.mkdir(parents=True, exist_ok=True)
    config = {
        **BACKENDS[backend],
        "use_cpu": True,
        "num_machines": 1,
        "num_processes": 2,
        "hf_seqpar": {"sp_size": 2, "mode": MODES[backend]},
    }
    (work / "zero3.json").write_text(json.dumps(ZERO3_JSON))  # the config names it relative to the launch directory
    (work / "accelerate.yaml").write_text(yaml.safe_dump(config))
    launcher = [sys.executable, "-c", "from hf_seqpar.__main__ import cli; cli()", "launch"]
    return _run([*launcher, "--config_file", work / "accelerate.yaml", *cmd], assets, work, shims)


def sp_run(assets, backend: str, lora: bool) -> SimpleNamespace:
    """SP=2 on 2 processes under `backend`, saving a checkpoint at step 2 (cached per session)."""
    key = (backend, lora)
    if key not in assets.runs:
        out = assets.root / f"sp_{backend}_lora{lora}"
        stdout = _launch(assets, out.name, backend, _script_cmd(assets, out, lora, "--save_steps", "2"))
        assert "DP 1 x SP 2" in stdout and f"mode {MODES[backend]}" in stdout  # hf_seqpar was on
        assets.runs[key] = _result(out, lora)
    return assets.runs[key]


# ---- checks -------------------------------------------------------------------------------------------------------


def worst_relative_differences(got: list[dict], want: list[dict], steps=range(1, STEPS + 1)) -> dict:
    """{key: worst |got - want| / |want|} over the rows of `want`; the same rows, every step's loss and grad_norm."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst = {}
    for row, ref in zip(got, want, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in ref:
                worst[key] = max(worst.get(key, 0.0), abs(row[key] - ref[key]) / abs(ref[key]))
    logged = {(r["step"], k) for r in want for k in ("loss", "grad_norm") if k in r}
    assert logged >= {(s, k) for s in steps for k in ("loss", "grad_norm")}
    return worst


def assert_same_curve(got: list[dict], want: list[dict], steps=range(1, STEPS + 1)) -> dict:
    worst = worst_relative_differences(got, want, steps)
    assert all(v <= RTOL for v in worst.values()), f"worst relative differences {worst} beyond rtol={RTOL}"
    print(f"worst relative differences: {worst}")
    return worst


def assert_same_weights(got: Path, want: Path) -> float:
    from safetensors.torch import load_file

    got, want = load_file(got), load_file(want)
    assert sorted(got) == sorted(want) and got
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= WEIGHT_ATOL, f"final weights differ by up to {worst} (atol {WEIGHT_ATOL})"
    print(f"worst weight difference: {worst:.3g}")
    return worst


def assert_sharded(backend: str, reports: list[dict]) -> None:
    """Both ranks hold about half of what is sharded, and together all of it."""
    assert len(reports) == 2
    names = reports[0]["params"].keys()
    if backend == "zero2":  # ZeRO-2 keeps whole parameters; the fp32 master weights and Adam states are partitioned
        assert {r["optimizer"] for r in reports} == {"DeepSpeedZeroOptimizer"}
        trainable = reports[0]["trainable_numel"]
        partitions = [r["fp32_partition_numel"] for r in reports]
        assert sum(partitions) >= trainable and max(partitions) < trainable, (partitions, trainable)
        return
    if backend == "zero3":
        assert {r["optimizer"] for r in reports} == {"DeepSpeedZeroOptimizer_Stage3"}
        assert {how for r in reports for _, _, how in r["params"].values()} == {"zero3"}
    else:
        assert reports[0]["wrapper"].startswith("FSDP")  # FSDPLlamaForCausalLM / FSDPPeftModel: FSDP2's classes
        assert {how for r in reports for _, _, how in r["params"].values()} == {"dtensor ['Shard(0)']"}
    for name in names:
        local = [r["params"][name][0] for r in reports]
        full = reports[0]["params"][name][1]
        assert max(local) <= math.ceil(full / 2) and sum(local) >= full, (name, local, full)


# ---- tests --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "lora"), MATRIX)
def test_sharded_backend_with_sp_matches_plain_run(assets, backend, lora):
    plain, sp = plain_run(assets, lora), sp_run(assets, backend, lora)
    assert_same_curve(sp.log, plain.log)
    assert_sharded(backend, sp.reports)
    assert_same_weights(sp.weights, plain.weights)  # the LoRA adapter, or the whole model


RESUMES = [(backend, lora) for backend in ("zero2", "zero3", "fsdp2") for lora in (0, 1)]
RESUMES += [("fsdp2-sharded-checkpoints", 0)]


@pytest.mark.parametrize(("backend", "lora"), [pytest.param(*run, marks=slow) for run in RESUMES])
def test_resume_from_sharded_checkpoint_continues_the_curve(assets, backend, lora):
    uninterrupted = sp_run(assets, backend, bool(lora))
    out = assets.root / f"resumed_{backend}_lora{lora}"
    shutil.copytree(uninterrupted.out / "checkpoint-2", out / "checkpoint-2")
    cmd = _script_cmd(assets, out, bool(lora), "--resume_from_checkpoint", out / "checkpoint-2")
    _launch(assets, out.name, backend, cmd)
    resumed = _result(out, bool(lora))
    tail = [row for row in uninterrupted.log if row["step"] > 2]
    assert_same_curve([row for row in resumed.log if row["step"] > 2], tail, steps=(3, 4))
    assert_sharded(backend, resumed.reports)  # the resumed run is sharded again
    if uninterrupted.weights.exists():  # SHARDED_STATE_DICT: save_model writes no file
        assert_same_weights(resumed.weights, uninterrupted.weights)


@slow
def test_stock_deepspeed_zero3_without_shims(assets):
    """As a user runs it: DeepSpeed JIT-builds its shared-memory op (cached in ~/.cache/torch_extensions)."""
    out = assets.root / "stock_zero3"
    _launch(assets, out.name, "zero3", _script_cmd(assets, out, False), shims=False)
    assert_same_curve(_result(out, False).log, plain_run(assets, False).log)


def test_launch_leaves_deepspeed_and_fsdp_cpu_configs_to_accelerate(monkeypatch, tmp_path):
    """ACCELERATE_USE_CPU turns every Accelerator into a MULTI_CPU one, which drops DeepSpeed for DDP; with
    zero3_init_flag the model is then already partitioned and the first forward fails on empty weights."""
    import accelerate.commands.launch

    from hf_seqpar.integrations.launch import launch

    seen = {}

    def fake_launch_command(args):
        seen[Path(args.config_file).read_text()] = (os.environ.get("ACCELERATE_USE_CPU"), args.main_process_port)

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", fake_launch_command)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for name, cluster in {"multi_cpu": {"distributed_type": "MULTI_CPU"}, **BACKENDS}.items():
        config = {**cluster, "use_cpu": True, "num_processes": 2, "hf_seqpar": {"sp_size": 2}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        seen.clear()
        launch(["--config_file", str(tmp_path / f"{name}.yaml"), "train.py"])
        ((_, (use_cpu, port)),) = seen.items()
        assert (use_cpu, port) == ("true" if name == "multi_cpu" else None, 0), name  # free port either way
