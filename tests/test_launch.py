"""`hf-seqpar launch` end to end on CPU: unmodified Trainer and TRL scripts, started on 2 or 4 gloo processes, log the
losses and gradient norms of the plain run (DESIGN.md, "Loss and gradients"), see every sample once per epoch, and
resume exactly. Plus the launcher's errors, the shipped accelerate configs, and the hooks themselves.

Every run is a real launch (a subprocess per worker), so the model, tokenizer and data are tiny and built once.
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

from hf_seqpar import SeqParConfig, SeqParGroups

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "tests" / "scripts" / "train_clm.py"
RTOL = 1e-4  # float32 sums of shard partials in another order than the plain run (observed: ~1e-7)
TIMEOUT_S = 240
TRL_ARGS = (
    "--max_steps 4 --per_device_train_batch_size 2 --per_device_eval_batch_size 2 --gradient_accumulation_steps 2 "
    "--learning_rate 0.5 --optim sgd --lr_scheduler_type constant --logging_steps 1 --eval_strategy steps "
    "--eval_steps 2 --save_strategy steps --save_steps 4 --seed 0 --use_cpu --bf16 False --dtype float32 "
    "--gradient_checkpointing False --report_to none --dataloader_num_workers 0 --max_length 64 --disable_tqdm True "
    "--use_peft --lora_r 8 --lora_alpha 16 --lora_dropout 0"  # dropout draws per-rank masks: not exact by design
).split()


# ---- assets and runners ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny Llama, tokenizer and data of tests/scripts/make_tiny_assets.py (built once), and a clean env."""
    build = runpy.run_path(str(ROOT / "tests" / "scripts" / "make_tiny_assets.py"))["build"]
    root = build(tmp_path_factory.mktemp("launch"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "cache"),
        "TOKENIZERS_PARALLELISM": "0",
    }
    env = {k: v for k, v in env.items() if not k.startswith("HF_SEQPAR_")}
    return SimpleNamespace(root=root, model=root / "model", data=root / "data", env=env)


def _run(cmd: list, assets, cwd: Path, **env) -> str:
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env={**assets.env, **env}, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"{cmd}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
    return done.stdout


def _hf_seqpar_cli() -> list:
    script = shutil.which("hf-seqpar", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from hf_seqpar.__main__ import cli; cli()"]


def _config_file(directory: Path, processes: int, cluster: dict | None = None, **section) -> Path:
    config = cluster or {"distributed_type": "MULTI_CPU", "use_cpu": True}
    path = directory / "accelerate.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**config, "num_machines": 1, "num_processes": processes, "hf_seqpar": section}))
    return path


def launch_sp(assets, name: str, processes: int, section: dict, script_cmd: list, cluster=None, config=None) -> str:
    """`hf-seqpar launch --config_file <config with the section> <script_cmd>` in its own directory (CPU default)."""
    work = assets.root / name
    config = config or _config_file(work, processes, cluster, **section)
    return _run([*_hf_seqpar_cli(), "launch", "--config_file", config, *script_cmd], assets, work)


def train_cmd(assets, output_dir: Path, *extra) -> list:
    train = ["--train_file", assets.data / "train.jsonl", "--eval_file", assets.data / "test.jsonl"]
    return [TRAIN_SCRIPT, "--model_dir", assets.model, *train, "--output_dir", output_dir, *extra]


def sft_cmd(assets, output_dir: Path, packing: bool) -> list:
    from trl.scripts import sft

    dataset = ["--model_name_or_path", assets.model, "--dataset_name", assets.data, "--output_dir", output_dir]
    return [sft.__file__, *dataset, *TRL_ARGS, *(["--packing"] if packing else [])]


def trl_log(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]


def assert_same_curve(got: list[dict], want: list[dict], steps=(1, 2, 3, 4)) -> None:
    """Same rows; loss and grad_norm at each step of `steps`, eval_loss wherever the plain run has one; within RTOL."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    keys = ("loss", "grad_norm", "eval_loss")
    pairs = [(row["step"], k, row[k], ref[k]) for row, ref in zip(got, want, strict=True) for k in keys if k in ref]
    assert {(step, key) for step, key, *_ in pairs} >= {(s, k) for s in steps for k in ("loss", "grad_norm")}
    bad = [p for p in pairs if abs(p[2] - p[3]) > RTOL * abs(p[3])]
    assert bad == [], f"(step, key, got, plain) beyond rtol={RTOL}: {bad}"
    # Counts the Trainer / TRL derive from the world size and the batches: exactly the plain run's (test_logs.py
    # checks every logged number of one script; these are the ones every launch test can check for free).
    counts = ("epoch", "num_tokens", "num_input_tokens_seen", "total_flos")
    rows = zip(got, want, strict=True)
    pairs = [(row["step"], k, row.get(k), ref[k]) for row, ref in rows for k in counts if k in ref]
    assert [p for p in pairs if p[2] != p[3]] == [], "(step, key, got, plain) of the counts"


# ---- plain runs (no hf_seqpar anywhere) -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def plain_trainer_log(assets):
    out = assets.root / "plain_trainer"
    _run([sys.executable, *train_cmd(assets, out, "--log_file", out / "log.json")], assets, out)
    return json.loads((out / "log.json").read_text())


@pytest.fixture(scope="session")
def plain_sft_logs(assets):
    logs = {}

    def get(packing: bool):
        if packing not in logs:
            out = assets.root / f"plain_sft_packing{packing}"
            _run([sys.executable, *sft_cmd(assets, out, packing)], assets, out)
            logs[packing] = trl_log(out)
        return logs[packing]

    return get


@pytest.fixture(scope="session")
def ring_trainer_run(assets):
    """The Trainer script with the shipped cpu_sp2.yaml (SP=2, ring), saving a checkpoint every 2 steps (the resume
    test restarts from one)."""
    out = assets.root / "sp_ring_trainer"
    cmd = train_cmd(assets, out, "--log_file", out / "log.json", "--save_steps", "2")
    shipped = ROOT / "accelerate_configs" / "cpu_sp2.yaml"
    stdout = launch_sp(assets, "sp_ring_trainer_launch", 2, {}, cmd, config=shipped)
    return SimpleNamespace(out=out, stdout=stdout, log=json.loads((out / "log.json").read_text()))


# ---- the unmodified scripts -------------------------------------------------------------------------------------


def test_trainer_script_ring_matches_plain_run(ring_trainer_run, plain_trainer_log):
    assert_same_curve(ring_trainer_run.log, plain_trainer_log)
    startup = [line for line in ring_trainer_run.stdout.splitlines() if line.startswith("hf_seqpar: world")]
    assert (
        startup == [startup[0]]
        and "world 2 = DP 1 x SP 2 (ulysses 1 x ring 2), mode ring, layout zigzag" in startup[0]
    )
    assert "tokens per rank" in startup[0]


@pytest.mark.slow  # Ulysses stays in make test through the TRL --packing launch and the pool parity tests
def test_trainer_script_ulysses_matches_plain_run(assets, plain_trainer_log):
    out = assets.root / "sp_ulysses_trainer"
    cmd = train_cmd(assets, out, "--log_file", out / "log.json")
    stdout = launch_sp(assets, "sp_ulysses_trainer_launch", 2, {"sp_size": 2, "mode": "ulysses"}, cmd)
    assert "(ulysses 2 x ring 1), mode ulysses, layout contiguous" in stdout
    assert_same_curve(json.loads((out / "log.json").read_text()), plain_trainer_log)


@pytest.mark.parametrize(
    ("mode", "packing"),
    [pytest.param("ring", False, marks=pytest.mark.slow), ("ulysses", True)],  # ring: the bf16-default SFT launch
)
def test_trl_sft_script_with_lora_matches_plain_run(assets, plain_sft_logs, mode, packing):
    out = assets.root / f"sp_sft_{mode}_packing{packing}"
    launch_sp(assets, f"{out.name}_launch", 2, {"sp_size": 2, "mode": mode}, sft_cmd(assets, out, packing))
    assert_same_curve(trl_log(out), plain_sft_logs(packing))


def test_trl_sft_script_with_its_own_bf16_default_matches_plain_run(assets, plain_sft_logs):
    """TRL's sft.py as users run it: bf16=True autocast over float32 weights (CPU autocast here). SP must agree with
    the plain bf16 run within a small multiple of what bf16 itself changes (plain bf16 vs the plain float32 run)."""
    logs = {}
    for name, section in (("plain", None), ("sp", {"sp_size": 2, "mode": "ring"})):
        out = assets.root / f"bf16_sft_{name}"
        cmd = sft_cmd(assets, out, False)
        at = cmd.index("--bf16")
        del cmd[at : at + 2]  # the client script's own default: bf16=True
        del cmd[cmd.index("--dtype") : cmd.index("--dtype") + 2]
        if section is None:
            _run([sys.executable, *cmd], assets, out)
        else:
            launch_sp(assets, f"{out.name}_launch", 2, section, cmd)
        logs[name] = trl_log(out)
    fp32 = plain_sft_logs(False)
    for key in ("loss", "grad_norm"):
        for sp, plain, ref in zip(logs["sp"], logs["plain"], fp32, strict=True):
            if key in plain:
                bf16_effect = abs(plain[key] - ref[key]) / abs(ref[key])
                # 4x what bf16 itself changes, floored at one bf16 rounding (2**-8)
                assert abs(sp[key] - plain[key]) / abs(plain[key]) <= 4 * max(bf16_effect, 2**-8), (key, sp, plain)


@pytest.mark.slow  # make test under 5 minutes: DP x SP stays in through the loaders' tests and the pool parity tests
def test_dp2_sp2_sees_every_sample_once_and_matches_plain_dp2(assets):
    # Plain DP=2 is torchrun on the script itself, without hf_seqpar: a baseline that shares no code with SP.
    plain, sp = assets.root / "plain_dp2", assets.root / "sp_dp2"
    for out in (plain, sp):
        (out / "samples").mkdir(parents=True)
    plain_cmd = train_cmd(assets, plain, "--log_file", plain / "log.json", "--sample_log_dir", plain / "samples")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, *plain_cmd], assets, plain, ACCELERATE_USE_CPU="1")
    sp_cmd = train_cmd(assets, sp, "--log_file", sp / "log.json", "--sample_log_dir", sp / "samples")
    stdout = launch_sp(assets, "sp_dp2_launch", 4, {"sp_size": 2, "mode": "ring"}, sp_cmd)
    assert "world 4 = DP 2 x SP 2 (ulysses 1 x ring 2)" in stdout

    def samples(out: Path, rank: int) -> list[int]:
        return [int(x) for x in (out / "samples" / f"rank{rank}.txt").read_text().split()]

    # 4 steps x 2 accumulated batches x 2 rows x 2 DP groups = the 32 rows: one epoch.
    assert samples(sp, 0) == samples(sp, 1) and samples(sp, 2) == samples(sp, 3)  # an SP group shares its rows
    assert sorted(samples(sp, 0) + samples(sp, 2)) == list(range(32))  # every row once per epoch
    assert (samples(sp, 0), samples(sp, 2)) == (samples(plain, 0), samples(plain, 1))  # DP rank r = plain rank r
    assert_same_curve(json.loads((sp / "log.json").read_text()), json.loads((plain / "log.json").read_text()))


def test_resume_from_checkpoint_reproduces_the_remaining_losses(assets, ring_trainer_run):
    out = assets.root / "sp_ring_resumed"
    shutil.copytree(ring_trainer_run.out / "checkpoint-2", out / "checkpoint-2")
    cmd = train_cmd(assets, out, "--log_file", out / "log.json", "--resume_from_checkpoint", out / "checkpoint-2")
    launch_sp(assets, "sp_ring_resumed_launch", 2, {"sp_size": 2, "mode": "ring"}, cmd)
    resumed = [row for row in json.loads((out / "log.json").read_text()) if row["step"] > 2]
    uninterrupted = [row for row in ring_trainer_run.log if row["step"] > 2]
    assert_same_curve(resumed, uninterrupted, steps=(3, 4))


def _first_step_mean_loss(assets, rows: int) -> tuple[float, list[int]]:
    """The plain model's mean token loss over the first `rows` rows of the train file, and each row's targets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(assets.model)
    model = AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32)
    lines = (assets.data / "train.jsonl").read_text().splitlines()[:rows]
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([tokenizer(json.loads(t)["text"]) for t in lines])
    targets = (batch["labels"][:, 1:] != -100).sum(1)
    with torch.no_grad():
        loss_sum = model(**batch, num_items_in_batch=1).loss  # summed over every target of the rows
    return loss_sum.item() / targets.sum().item(), targets.tolist()


@pytest.mark.slow  # make test under 5 minutes: the plugin switches with the same code as the unmodified-loop launch
def test_plugin_switches_a_custom_accelerate_loop(assets):
    # 2 micro-batches of 2 rows per optimizer step: the loss is the step's token mean (N over the whole step)
    script = ROOT / "tests" / "scripts" / "accelerate_loop.py"
    args = ["--model_dir", assets.model, "--train_file", assets.data / "train.jsonl", "--grad_accum", "2"]
    args += ["--batch_size", "2"]
    plain, sp = assets.root / "plugin_plain", assets.root / "plugin_sp"
    _run([sys.executable, script, *args, "--log_file", plain / "log.json"], assets, plain)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(
        [*torchrun, script, *args, "--log_file", sp / "log.json", "--sp_size", "2"], assets, sp, ACCELERATE_USE_CPU="1"
    )
    got, want = (json.loads((out / "log.json").read_text()) for out in (sp, plain))
    assert len(want) == 4
    assert_same_curve(
        [{**r, "step": i} for i, r in enumerate(got, 1)], [{**r, "step": i} for i, r in enumerate(want, 1)]
    )
    step_mean, targets = _first_step_mean_loss(assets, rows=4)
    assert sum(targets[:2]) != sum(targets[2:])  # so a per-micro-batch mean would differ
    assert abs(got[0]["loss"] - step_mean) <= RTOL * step_mean


def test_plugin_refuses_gradient_accumulation_without_the_step_count():
    from hf_seqpar import SequenceParallelPlugin

    plugin = SequenceParallelPlugin(SeqParConfig(sp_size=1))
    plugin.accelerator = SimpleNamespace(gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match=r"^hf_seqpar: with gradient_accumulation_steps=4 .* num_items_in_batch="):
        plugin.loss(None, {"labels": torch.zeros(1, 4, dtype=torch.long)})


# ---- errors, configs and the hooks themselves (in this process, no launch) --------------------------------------


def test_unknown_key_in_the_section_is_named(assets):
    work = assets.root / "unknown_key"
    config = _config_file(work, 2, sp_size=2, mode="ring", sp_sise=4)
    cmd = [*_hf_seqpar_cli(), "launch", "--config_file", config, TRAIN_SCRIPT]
    done = subprocess.run([str(c) for c in cmd], cwd=work, env=assets.env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "unknown keys ['sp_sise'] in the 'hf_seqpar:' section" in done.stderr
    assert "Traceback" not in done.stderr  # one clear line, and no worker was started


def test_sp_size_must_divide_the_world(tmp_path):
    from hf_seqpar.integrations.accelerator import groups_for
    from hf_seqpar.integrations.launch import launch

    config = _config_file(tmp_path, 2, sp_size=3)
    with pytest.raises(ValueError, match=r"sp_size=3 must divide world_size=2"):
        launch(["--config_file", str(config), str(TRAIN_SCRIPT)])
    # the same check where the groups are built, for launches that bypass hf-seqpar launch (torchrun -m hf_seqpar)
    with pytest.raises(ValueError, match=r"sp_size=2 must divide world_size=1 \(this process is not in a distrib"):
        groups_for(SeqParConfig(sp_size=2), {})


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs(path, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from hf_seqpar.integrations.launch import read_config_file

    assert path.read_text().startswith("# ")  # each file says what it is for
    config, cluster = read_config_file(path)
    assert config is not None and config.sp_size > 1
    assert cluster["num_processes"] % config.sp_size == 0
    sanitized = tmp_path / "sanitized.yaml"
    sanitized.write_text(yaml.safe_dump(cluster))
    load_config_from_file(str(sanitized))  # accelerate accepts what is left (it refuses unknown keys)


@pytest.fixture
def fresh_hooks():
    """Install hooks in this process for one test, then put the originals back (other tests build Trainers)."""
    import accelerate.accelerator
    import accelerate.data_loader
    from transformers import Trainer

    saved = [(Trainer, "__init__"), (accelerate.accelerator, "prepare_data_loader")]
    saved += [(accelerate.accelerator.Accelerator, "prepare")]
    saved += [(accelerate.data_loader, "prepare_data_loader")]
    saved = [(owner, name, owner.__dict__[name]) for owner, name in saved]
    yield
    for owner, name, original in saved:
        setattr(owner, name, original)


def test_hooks_install_once_and_check_upstream(fresh_hooks):
    import accelerate.accelerator
    import accelerate.data_loader
    from transformers import Trainer

    from hf_seqpar.integrations.activate import activate
    from hf_seqpar.integrations.patches import KEY_ATTR, ORIGINAL_ATTR, check_params

    config = SeqParConfig(sp_size=2, mode="ring")
    original_init = Trainer.__init__
    activate(config)
    activate(config)  # idempotent: still one layer of wrapping
    assert getattr(Trainer.__init__, ORIGINAL_ATTR) is original_init
    originals = {
        getattr(m.prepare_data_loader, ORIGINAL_ATTR) for m in (accelerate.accelerator, accelerate.data_loader)
    }
    assert len(originals) == 1 and not hasattr(originals.pop(), ORIGINAL_ATTR)  # both bindings, wrapped once
    ulysses = SeqParConfig(sp_size=2, mode="ulysses")
    activate(ulysses)  # another config replaces the hook (tests/test_accelerate_loop.py checks the rest)
    assert getattr(Trainer.__init__, ORIGINAL_ATTR) is original_init
    assert getattr(Trainer.__init__, KEY_ATTR) == ("trainer", ulysses)
    with pytest.raises(RuntimeError, match=r"parameters \['torch_device_mesh'\] are gone"):
        check_params(lambda dataloader, num_processes: None, ("dataloader", "torch_device_mesh"), "a renamed hook")


class _Rows(torch.utils.data.IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter({"idx": i} for i in range(self.n))


@pytest.mark.parametrize("iterable", [False, True], ids=["map-style", "iterable"])
def test_data_loaders_are_sharded_by_dp_rank_only(fresh_hooks, iterable):
    import accelerate.accelerator

    from hf_seqpar.integrations.collator import SequenceShardingCollator
    from hf_seqpar.integrations.loaders import install_data_loader_hook

    def loader(seen: list, sharding: bool):
        def base(features):
            seen.extend(f["idx"] for f in features)
            return {"input_ids": torch.ones(len(features), 8, dtype=torch.long)}

        collate = base
        if sharding:  # this rank: global rank 3 of 4 = DP rank 1 x SP rank 1
            groups = SeqParGroups(sp_group=None, sp_rank=1, sp_size=2, dp_group=None, dp_rank=1, dp_size=2)
            collate = SequenceShardingCollator(base, config=SeqParConfig(sp_size=2), groups=groups)
        rows = _Rows(12) if iterable else [{"idx": i} for i in range(12)]
        return torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collate)

    install_data_loader_hook()
    prepare = accelerate.accelerator.prepare_data_loader
    plain_seen, sp_seen = [], []
    # put_on_device=True would select accelerate's dispatcher for iterable data (slicing by global rank)
    plain = loader(plain_seen, False)
    list(prepare(plain, num_processes=2, process_index=1, put_on_device=True, dispatch_batches=False))  # DP rank 1
    batches = list(prepare(loader(sp_seen, True), num_processes=4, process_index=3, put_on_device=True))
    assert sp_seen == plain_seen == [2, 3, 6, 7, 10, 11]
    assert all(batch["input_ids"].shape == (2, 4) for batch in batches)  # and the collator cut this rank's shard


def test_runner_runs_a_script_or_module_as_main(tmp_path, assets):
    probe = "import json, sys; print(json.dumps([__name__, sys.argv[1:], sys.path[0]]))"
    (tmp_path / "probe.py").write_text(probe)
    for target, path0 in ((["probe.py"], str(tmp_path)), (["-m", "probe"], None)):  # no HF_SEQPAR_*: SP off
        stdout = _run([sys.executable, "-m", "hf_seqpar", *target, "a", "--b"], assets, tmp_path, PYTHONPATH=tmp_path)
        assert "sequence parallelism is off" in stdout
        name, argv, first_path = json.loads(stdout.splitlines()[-1])
        assert (name, argv) == ("__main__", ["a", "--b"]) and first_path == (path0 or first_path)


def test_gpu_configs_go_to_accelerate_with_the_section_stripped(monkeypatch, tmp_path):
    import accelerate.commands.launch

    from hf_seqpar.integrations.launch import launch

    seen = {}

    def fake_launch_command(args):
        seen.update(vars(args), env={k: v for k, v in os.environ.items() if k.startswith("HF_SEQPAR_")})
        seen["config_text"] = Path(args.config_file).read_text()

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", fake_launch_command)
    monkeypatch.setenv("HF_SEQPAR_RING_SIZE", "3")  # stale shell setting: the file's section wins, whole
    launch(["--config_file", str(ROOT / "accelerate_configs" / "gpu_1x8_usp_4x2.yaml"), "train.py", "--lr", "1"])
    assert (seen["training_script"], seen["module"], seen["training_script_args"]) == (
        "hf_seqpar",
        True,
        ["train.py", "--lr", "1"],
    )
    assert "hf_seqpar" not in yaml.safe_load(seen["config_text"]) and "MULTI_GPU" in seen["config_text"]
    assert seen["env"] == SeqParConfig(sp_size=8, mode="usp", ulysses_size=4, ring_size=2).to_env()
    assert os.environ["HF_SEQPAR_RING_SIZE"] == "3"  # restored after the launch


# ---- GPUs: DDP, FSDP2 (full and LoRA), DeepSpeed ZeRO-2/3 (deselected by default; skipped without 2 GPUs) --------

FSDP2 = {
    "fsdp_version": 2,
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_state_dict_type": "FULL_STATE_DICT",
}
ZERO = {"offload_optimizer_device": "none", "offload_param_device": "none", "zero3_init_flag": False}
GPU_RUNS = {  # name: (accelerate config without the section, script)
    "ddp": ({"distributed_type": "MULTI_GPU"}, "trainer"),
    "fsdp2": ({"distributed_type": "FSDP", "fsdp_config": FSDP2}, "trainer"),
    "fsdp2-lora": ({"distributed_type": "FSDP", "fsdp_config": FSDP2}, "sft"),
    "zero2": ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2, **ZERO}}, "trainer"),
    "zero3": ({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3, **ZERO}}, "trainer"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_RUNS)
def test_gpu_parallelism_matches_plain_run(assets, name):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    if name.startswith("zero"):
        pytest.importorskip("deepspeed")
    cluster, script = GPU_RUNS[name]
    plain, sp = assets.root / f"gpu_plain_{name}", assets.root / f"gpu_sp_{name}"
    if script == "trainer":
        cmds = [train_cmd(assets, out, "--gpu", "--log_file", out / "log.json") for out in (plain, sp)]
    else:
        cmds = [[*sft_cmd(assets, out, packing=True)] for out in (plain, sp)]
        cmds = [[a for a in cmd if a != "--use_cpu"] for cmd in cmds]
    _run([sys.executable, *cmds[0]], assets, plain, CUDA_VISIBLE_DEVICES="0")
    launch_sp(assets, f"{sp.name}_launch", 2, {"sp_size": 2, "mode": "ulysses"}, cmds[1], cluster=cluster)
    logs = [json.loads((out / "log.json").read_text()) if script == "trainer" else trl_log(out) for out in (sp, plain)]
    assert_same_curve(*logs)


# ---- tensor parallelism x SP (tp_size in the section) ----------------------------------------------------------


@pytest.fixture(scope="session")
def tp_trainer_run(assets):
    """The Trainer script at world 4 = TP 2 x SP 2 (ring), saving a checkpoint every 2 steps."""
    out = assets.root / "tp2_sp2_trainer"
    cmd = train_cmd(assets, out, "--log_file", out / "log.json", "--save_steps", "2")
    stdout = launch_sp(assets, "tp2_sp2_trainer_launch", 4, {"sp_size": 2, "tp_size": 2, "mode": "ring"}, cmd)
    return SimpleNamespace(out=out, stdout=stdout, log=json.loads((out / "log.json").read_text()))


@pytest.mark.slow  # 4 processes; make test keeps TP x SP through tests/test_tensor_parallel.py
def test_trainer_script_tp2_sp2_matches_plain_run(tp_trainer_run, plain_trainer_log):
    assert "world 4 = DP 1 x SP 2 (ulysses 1 x ring 2) x TP 2 (Megatron-SP)" in tp_trainer_run.stdout
    assert_same_curve(tp_trainer_run.log, plain_trainer_log)
    # the checkpoint holds the plain model's tensors, whole (gathered over the TP group)
    from safetensors.torch import load_file

    saved = load_file(tp_trainer_run.out / "checkpoint-2" / "model.safetensors")
    plain = load_file(assets_model_file(tp_trainer_run))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.items()}


def assets_model_file(run) -> Path:
    return run.out.parent / "model" / "model.safetensors"


@pytest.mark.slow
def test_tp_resume_from_checkpoint_reproduces_the_remaining_losses(assets, tp_trainer_run):
    out = assets.root / "tp2_sp2_resumed"
    shutil.copytree(tp_trainer_run.out / "checkpoint-2", out / "checkpoint-2")
    cmd = train_cmd(assets, out, "--log_file", out / "log.json", "--resume_from_checkpoint", out / "checkpoint-2")
    launch_sp(assets, "tp2_sp2_resumed_launch", 4, {"sp_size": 2, "tp_size": 2, "mode": "ring"}, cmd)
    resumed = [row for row in json.loads((out / "log.json").read_text()) if row["step"] > 2]
    uninterrupted = [row for row in tp_trainer_run.log if row["step"] > 2]
    assert_same_curve(resumed, uninterrupted, steps=(3, 4))
    assert (tp_trainer_run.out / "checkpoint-2" / "optimizer_tp1.pt").is_file()


@pytest.mark.slow
def test_trl_sft_script_with_lora_tp2_sp2_matches_plain_run(assets, plain_sft_logs):
    out = assets.root / "tp2_sp2_sft"
    section = {"sp_size": 2, "tp_size": 2, "mode": "ulysses"}
    launch_sp(assets, f"{out.name}_launch", 4, section, sft_cmd(assets, out, True))
    assert_same_curve(trl_log(out), plain_sft_logs(True))
