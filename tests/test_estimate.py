"""`hf-seqpar estimate`: parameter counts equal the real models', and the memory of a training step agrees with
benchmarks/memory.py's measurement (same model building, same live-tensor counter) within 15%, on CPU sizes, with
and without gradient checkpointing and chunked loss, at sp 1 and 2; and with its results file when it exists."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from hf_seqpar.estimate import PRESETS, ModelShape, cli, estimate_memory, recommend

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TOLERANCE = 0.15  # the bound; measured agreement on these points is within 4%


def _count(config: dict) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["llama3-8b", "qwen3-30b-a3b", "gemma2-9b", "phi3-mini"])
def test_parameter_count_equals_the_model(preset):
    small = {**PRESETS[preset], "num_hidden_layers": 2}  # the count is per layer; two layers keep this fast
    if "num_experts" in small:
        small["num_experts"] = 4
    assert ModelShape.from_config(small).params == _count(small)


def test_lora_parameter_count_equals_peft():
    from peft import LoraConfig, get_peft_model

    config = {**PRESETS["llama3.2-1b"], "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512}
    config.update(num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert ModelShape.from_config(config).lora_params == trainable


def _memory_module():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import memory

    return memory


TINY = {  # memory.py's "small" Llama, shrunk to run in a second: the vocabulary still needs several loss chunks
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 16000,
}


def _measure(world: int, seq: int, config: str, model: str = "tiny") -> int:
    """benchmarks/memory.py's own build and counter, for one rank (inside a RankPool body when world > 1)."""
    memory = _memory_module()
    memory.MODELS.setdefault("tiny", TINY)
    opts = argparse.Namespace(model=model, config=config, mode="ring", seq=seq)
    model, batch, num_items = memory._build(opts, torch.device("cpu"), world)
    with memory.LiveTensorBytes() as live:
        model(**batch, num_items_in_batch=num_items).loss.backward()
    return live.peak


def _estimate(world: int, seq: int, config: str, model: dict = TINY) -> int:
    shape = ModelShape.from_config({**model, "tie_word_embeddings": False})
    ckpt, savings = _memory_module().CONFIGS[config]
    tiled = savings.get("tiled_mlp", False)
    got = estimate_memory(shape, seq, world, mode="ring", dtype="float32", grad_ckpt=ckpt, tiled_mlp=tiled)
    return got["step_peak_chunked" if savings.get("chunked_loss") else "step_peak_plain"]


CONFIGS = ["plain", "ckpt", "chunked_loss", "ckpt+chunked_loss", "tiled_mlp", "ckpt+chunked_loss+tiled_mlp"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", [pytest.param("plain", marks=pytest.mark.slow), "ckpt+chunked_loss"])
def test_estimate_agrees_with_the_measurement(one_thread, config):
    measured, estimated = _measure(1, 2048, config), _estimate(1, 2048, config)
    assert abs(estimated / measured - 1) < TOLERANCE, (estimated, measured)


def _body_measure(seq, config):
    sys.path.insert(0, str(BENCHMARKS))
    return _measure(2, seq, config)


@pytest.mark.parametrize("config", ["plain", pytest.param("ckpt+chunked_loss", marks=pytest.mark.slow)])
def test_estimate_agrees_with_the_measurement_sp2(ranks, config):
    estimated = _estimate(2, 1024, config)
    for measured in ranks.run(_body_measure, 1024, config):
        assert abs(estimated / measured - 1) < TOLERANCE, (estimated, measured)


def test_estimate_agrees_with_the_memory_benchmark_results():
    path = BENCHMARKS / "results" / "memory_cpu.json"
    if not path.exists():
        pytest.skip("benchmarks/results/memory_cpu.json not written yet (python benchmarks/memory.py)")
    points = [p for p in json.loads(path.read_text())["points"] if p["config"] in CONFIGS and p["peak_bytes_max"]]
    assert points
    for p in points:
        estimated = _estimate(p["sp"], p["seq"], p["config"], _memory_module().MODELS["small"])
        assert abs(estimated / p["peak_bytes_max"] - 1) < TOLERANCE, (p["sp"], p["seq"], p["config"])


def test_recommendation_and_report(capsys):
    shape = ModelShape.from_config(PRESETS["llama3-70b"])
    assert recommend(shape, 16, 2)[:3] == ("usp", 8, 2)  # Ulysses in the node, ring across the two
    assert recommend(shape, 8, 1)[:3] == ("ulysses", 8, 1)
    qwen = ModelShape.from_config(PRESETS["qwen2.5-7b"])  # 28 heads: 8 does not divide them
    assert recommend(qwen, 8, 1)[:3] == ("usp", 4, 2)
    cli(["--model", "llama3-8b", "--seq-len", "131072", "--gpus", "8", "--lora"])
    text = capsys.readouterr().out
    assert "mode=ulysses" in text and "with chunked_loss" in text and "communication / compute" in text
    with pytest.raises(SystemExit, match="hf-seqpar estimate: error: hf_seqpar: --seq-len 1000"):
        cli(["--model", "llama3-8b", "--seq-len", "1000", "--gpus", "8"])
