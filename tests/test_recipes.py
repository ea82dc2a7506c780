"""recipes/: each recipe's script, run with --tiny under `hf-seqpar launch` on CPU (its own accelerate config's mode
and savings, scaled to 2 ranks; a one-GPU recipe on 1 process with its savings; a TP x SP recipe at TP 2 x SP 2 on 4),
logs the loss and grad_norm of the same script run plainly (in this process, no hf_seqpar, no savings); each config is
valid for its GPUs and its model's heads, a TP recipe's layout is the estimator's recommendation; the README's token
arithmetic and memory are the scripts', configs' and estimator's.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_seqpar.estimate import PRESETS, SAVINGS, ModelShape, cli
from hf_seqpar.integrations.launch import read_config_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
NAMES = sorted(p.parent.name for p in RECIPES.glob("*/train.py"))
RTOL = 1e-4  # float32 sums of shard partials in another order than the plain run (observed: ~1e-7)
TIMEOUT_S = 240
RECIPE_GPUS = {"llama31_8b_640k_1gpu": 1}  # GPUs of a recipe that is not for one node of 8
TP_NAMES = [n for n in NAMES if read_config_file(RECIPES / n / "accelerate_config.yaml")[0].tp_size > 1]


def test_every_recipe_is_found():
    assert NAMES == [
        "llama31_70b_128k_tp4_sp2",
        "llama31_8b_128k_ring",
        "llama31_8b_640k_1gpu",
        "mistral_7b_64k_sliding",
        "qwen25_7b_256k_usp",
    ]


def _cpu_config(name: str, directory: Path) -> Path:
    """The recipe's hf_seqpar section on CPU: sp_size 2 on 2 processes, same mode (usp keeps its inner Ulysses dim);
    a one-GPU recipe (sp_size 1) as it is, on 1 process; tp_size > 1 as tp_size 2 x sp_size 2 on 4 processes."""
    section = yaml.safe_load((RECIPES / name / "accelerate_config.yaml").read_text())["hf_seqpar"]
    tp = 2 if section.get("tp_size", 1) > 1 else 1
    processes = 1 if section["sp_size"] == 1 and tp == 1 else 2 * tp
    if processes > 1:
        section["sp_size"] = 2
    if tp > 1:
        section["tp_size"] = tp
    if section.get("mode") == "usp":
        section.update(ulysses_size=2, ring_size=1)
    distributed = "MULTI_CPU" if processes > 1 else "NO"
    config = {"distributed_type": distributed, "use_cpu": True, "num_machines": 1, "num_processes": processes}
    path = directory / f"cpu_sp{section['sp_size']}_tp{tp}.yaml"
    path.write_text(yaml.safe_dump({**config, "hf_seqpar": section}))
    return path


def _hf_seqpar_cli() -> list:
    script = shutil.which("hf-seqpar", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from hf_seqpar.__main__ import cli; cli()"]


def _curve(log_file: Path) -> list[tuple[int, float, float]]:
    rows = json.loads(log_file.read_text())
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def _plain_run(name: str, out: Path) -> list:
    """The script's own `main` in this process: no hf_seqpar, one process, whole rows."""
    from accelerate.state import AcceleratorState

    main = runpy.run_path(str(RECIPES / name / "train.py"), run_name="recipe_plain")["main"]
    try:
        main(["--tiny", "--output_dir", str(out), "--log_file", str(out / "log.json")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate state to later tests
    return _curve(out / "log.json")


# make test under 5 minutes: the one-GPU recipe's launch stays (sp_size=1, every saving, against its plain run);
# the SP launch of a Trainer script stays in test_launch.py
SLOW_TINY = {"llama31_70b_128k_tp4_sp2", "llama31_8b_128k_ring", "mistral_7b_64k_sliding", "qwen25_7b_256k_usp"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TINY else n for n in NAMES])
def test_recipe_tiny_under_sp_matches_plain_run(name, tmp_path):
    sp_out, plain_out = tmp_path / "sp", tmp_path / "plain"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_SEQPAR_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="0", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    cpu_config = _cpu_config(name, tmp_path)
    cmd = [*_hf_seqpar_cli(), "launch", "--config_file", cpu_config, RECIPES / name / "train.py"]
    cmd += ["--tiny", "--output_dir", sp_out, "--log_file", sp_out / "log.json"]
    done = subprocess.run(
        [str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
    config, _ = read_config_file(cpu_config)
    if config.sp_size == 1:  # the savings are switched on, and exact: the plain run has none of them
        assert f"sequence parallelism is off; memory savings on: {', '.join(config.memory_savings)}" in done.stdout
    else:
        ulysses, ring = config.split
        tp = f" x TP {config.tp_size} (Megatron-SP)" if config.tp_size > 1 else ""
        world = f"world {config.parallel_size} = DP 1 x SP 2 (ulysses {ulysses} x ring {ring}){tp}"
        assert f"hf_seqpar: {world}, mode {config.mode}" in done.stdout
    assert (sp_out / "adapter_model.safetensors").exists()  # the LoRA adapter is saved

    sp, plain = _curve(sp_out / "log.json"), _plain_run(name, plain_out)
    assert [s for s, *_ in sp] == [s for s, *_ in plain] == [1, 2, 3, 4]
    for (step, loss, grad), (_, loss_ref, grad_ref) in zip(sp, plain, strict=True):
        assert loss == pytest.approx(loss_ref, rel=RTOL), f"step {step} loss"
        assert grad == pytest.approx(grad_ref, rel=RTOL), f"step {step} grad_norm"
    assert plain[-1][1] < plain[0][1]  # and the tiny run learns something: the comparison is not of constants


@pytest.mark.parametrize("name", NAMES)
def test_recipe_config_fits_its_gpus(name):
    config, cluster = read_config_file(RECIPES / name / "accelerate_config.yaml")
    assert cluster["num_processes"] == RECIPE_GPUS.get(name, 8)
    assert cluster["num_processes"] % config.parallel_size == 0 and cluster["mixed_precision"] == "bf16"
    shape = ModelShape.from_config(PRESETS[MODELS[name]])
    config.resolve(shape.heads, shape.kv_heads)  # the real model's heads divide over tp_size and the Ulysses degree
    if config.sp_size == 1:  # one GPU holds the whole sequence: it takes every saving there is
        assert set(config.memory_savings) == set(SAVINGS.values())


def _readme_rows() -> dict[str, tuple[int, int, int, int, int]]:
    """recipe directory -> (tokens per sequence, sp_size, tokens per SP shard, tp_size, tokens per rank) from
    recipes/README.md's table (`... / sp 2 = 65,536 per SP shard / tp 4 = 16,384 per rank` with tensor parallelism)."""
    rows = {}
    pattern = (
        r"\[`(\w+)/`\].*?`1 x ([\d,]+) tokens / sp (\d+) = ([\d,]+) per (?:rank|SP shard / tp (\d+) = ([\d,]+) "
        r"per rank)`"
    )
    for line in (RECIPES / "README.md").read_text().splitlines():
        found = re.search(pattern, line)
        if found:
            name, tokens, sp_size, per_shard, tp_size, per_rank = found.groups()
            numbers = (tokens, sp_size, per_shard, tp_size or "1", per_rank or per_shard)
            rows[name] = tuple(int(n.replace(",", "")) for n in numbers)
    return rows


def test_readme_token_arithmetic_is_the_recipes():
    rows = _readme_rows()
    assert sorted(rows) == NAMES
    for name, (tokens, sp_size, per_shard, tp_size, per_rank) in rows.items():
        source = (RECIPES / name / "train.py").read_text()
        default = re.search(r'"--max_length", type=int, default=(\d+)', source)
        config, _ = read_config_file(RECIPES / name / "accelerate_config.yaml")
        assert (tokens, sp_size, tp_size) == (int(default.group(1)), config.sp_size, config.tp_size), name
        assert per_shard * sp_size == tokens and per_rank * tp_size == per_shard, name


H100_1GPU = "llama31_8b_640k_1gpu on an H100, `--max_length 524288`"
ESTIMATE_INPUTS = {  # README memory row -> (recipe, estimate preset, tokens per sequence, ranks sharing it (sp x tp),
    # mode, ulysses, the GPU it must fit with the estimate's reserve: for the one-GPU recipe, whose lengths were chosen
    # so, and the 70B one, whose layout was)
    "llama31_70b_128k_tp4_sp2": ("llama31_70b_128k_tp4_sp2", "llama3-70b", 131072, 8, "ulysses", 2, "h100"),
    "llama31_8b_128k_ring": ("llama31_8b_128k_ring", "llama3-8b", 131072, 8, "ring", 1, None),
    "qwen25_7b_256k_usp": ("qwen25_7b_256k_usp", "qwen2.5-7b", 262144, 8, "usp", 4, None),
    "mistral_7b_64k_sliding": ("mistral_7b_64k_sliding", "mistral-7b", 65536, 4, "ulysses", 4, None),
    "llama31_8b_640k_1gpu": ("llama31_8b_640k_1gpu", "llama3-8b", 655360, 1, "ring", 1, "h200"),
    H100_1GPU: ("llama31_8b_640k_1gpu", "llama3-8b", 524288, 1, "ring", 1, "h100"),
}
MODELS = {name: preset for name, preset, *_ in ESTIMATE_INPUTS.values()}  # recipe -> its model's estimate preset


def test_readme_memory_is_the_estimate():
    """recipes/README.md's per-GPU totals are what hf_seqpar.estimate computes for each recipe's shape and savings."""
    from hf_seqpar.estimate import GIB, GPUS, PRESETS, RESERVE_GIB, ModelShape, estimate_memory

    text = (RECIPES / "README.md").read_text()
    for row_name, (name, preset, tokens, ranks, mode, ulysses, gpu) in ESTIMATE_INPUTS.items():
        config, _ = read_config_file(RECIPES / name / "accelerate_config.yaml")
        assert (config.parallel_size, config.mode, config.split[0]) == (ranks, mode, ulysses), name
        savings = {
            "tiled_mlp": config.tiled_mlp,
            "offload": config.offload_checkpoints,
            "recompute_norms": config.recompute_norms,
            "recompute_lora_inputs": config.recompute_lora_inputs,
        }
        memory = estimate_memory(ModelShape.from_config(PRESETS[preset]), tokens, ranks, mode=mode, ulysses=ulysses,
                                 lora=True, tp=config.tp_size, **savings)  # fmt: skip
        row = re.search(rf"^\| {re.escape(row_name)} \|.*\*\*([\d.]+)\*\* \| ([\d.]+) \|$", text, re.M)
        assert row, f"no memory row for {row_name}"
        assert float(row.group(1)) == round(memory["total_chunked"] / GIB, 1), row_name
        assert float(row.group(2)) == round(memory["total_plain"] / GIB, 1), row_name
        if gpu:
            assert memory["total_chunked"] <= GPUS[gpu].memory_gib * 1e9 - RESERVE_GIB * GIB, row_name
        if f"default={tokens}" not in (RECIPES / name / "train.py").read_text():  # a variant: the script says how
            assert f"--max_length {tokens}" in (RECIPES / name / "train.py").read_text(), row_name


@pytest.mark.parametrize("name", TP_NAMES)
def test_tp_recipe_layout_is_the_estimators_recommendation(name, capsys):
    """`hf-seqpar estimate` for the recipe's model, length and GPUs (H100, its default) recommends the config's
    tp_size x sp_size and mode, and its verdict for that layout is a fit."""
    config, cluster = read_config_file(RECIPES / name / "accelerate_config.yaml")
    _, preset, tokens, *_ = ESTIMATE_INPUTS[name]
    flags = ["--model", preset, "--seq-len", str(tokens), "--gpus", str(cluster["num_processes"]), "--lora"]
    flags += ["--chunked-loss"] if config.chunked_loss else []
    cli(flags)
    layout = f"tp_size={config.tp_size}, sp_size={config.sp_size}, mode={config.mode}:"
    assert f"Recommended layout: {layout}" in capsys.readouterr().out
    cli([*flags, "--tp-size", str(config.tp_size)])
    assert capsys.readouterr().out.splitlines()[-1].startswith("Verdict: fits")
