"""The costs of TP x SP (issue #17): the bytes each rank sends in a training step of a tiny Llama at TP 2 x SP 2 equal
the formulas `hf-seqpar estimate` uses, per process group (benchmarks/tp_comm_volume.py's measurement, gloo, bf16);
and the estimator's tp_size terms: tp_size=1 unchanged, tp_size=2 splits the q/k/v/o and MLP weights only, and
the layout comparison's recommendation for Llama-3-70B LoRA at 128K on 8 x H100."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from hf_seqpar.estimate import GPUS, PRESETS, ModelShape, cli, estimate_memory, step_times

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_GROUPS: dict = {}
TOLERANCE = 0.15  # the estimator's bound (tests/test_estimate.py); measured agreement at TP 2 x SP 2 is within 2%


def _body_tp_bytes(mode, ckpt):
    import torch.distributed as dist

    import hf_seqpar

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import tp_comm_volume

    sp = dist.get_world_size() // 2
    if mode not in _GROUPS:
        _GROUPS[mode] = hf_seqpar.init_groups(hf_seqpar.SeqParConfig(sp_size=sp, tp_size=2, mode=mode))
    return tp_comm_volume.measure(mode, 2, 64, "bfloat16", ckpt, groups=_GROUPS[mode])


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize("mode,ckpt", [("ring", "non-reentrant"), ("ring", "reentrant"), ("ulysses", None)])
def test_tp_sp_bytes_equal_the_formula(ranks, mode, ckpt):
    for rank, row in enumerate(ranks.run(_body_tp_bytes, mode, ckpt)):
        assert row["measured"] == row["formula"], f"rank {rank}: {row}"
        assert row["unlabelled"] == 0, f"rank {rank}: bytes on a group that is neither TP nor SP: {row}"
        assert row["measured"]["tp"][0] > 0 and row["measured"]["sp"][0] > 0


TINY = {  # test_estimate's tiny Llama with a small vocabulary: the layers' activations, not the logits, set the peak
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def _body_tp_memory(tp, seq):
    import torch.distributed as dist

    import hf_seqpar

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    from memory import LiveTensorBytes

    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size() // tp, tp_size=tp, mode="ring")
    if ("ring", tp) not in _GROUPS:
        _GROUPS["ring", tp] = hf_seqpar.init_groups(cfg)
    groups = _GROUPS["ring", tp]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().train()
    hf_seqpar.apply_sequence_parallel(model, config=cfg, groups=groups)
    ids = torch.randint(0, TINY["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    batch = hf_seqpar.SequenceShardingCollator(lambda _: {"input_ids": ids, "labels": ids}, config=cfg, groups=groups)
    batch = batch([None])
    with LiveTensorBytes() as live:
        model(**batch, num_items_in_batch=torch.tensor(seq - 1)).loss.backward()
    return live.peak


@pytest.mark.parametrize("ranks", [4], indirect=True)
def test_tp_memory_estimate_agrees_with_the_measurement(ranks):
    """TP 2 x SP 2, float32 full fine-tuning without checkpointing: the layers keep each block's gathered input."""
    shape = ModelShape.from_config({**TINY, "tie_word_embeddings": False})
    estimated = estimate_memory(shape, 2048, 4, mode="ring", dtype="float32", grad_ckpt=False, tp=2)
    for measured in ranks.run(_body_tp_memory, 2, 2048):
        assert abs(estimated["step_peak_plain"] / measured - 1) < TOLERANCE, (estimated["step_peak_plain"], measured)


def _meta_model(config: dict):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))


SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_tp_divides_the_split_weights_only():
    config = {**PRESETS["llama3-8b"], "num_hidden_layers": 2}
    shape = ModelShape.from_config(config)
    named = dict(_meta_model(config).named_parameters())
    split = sum(p.numel() for n, p in named.items() if n.split(".")[-2] in SPLIT)
    whole = sum(p.numel() for n, p in named.items() if n.split(".")[-2] not in SPLIT)  # embeddings, norms, lm_head
    plain, halved = (estimate_memory(shape, 8192, 2, tp=tp) for tp in (1, 2))
    assert plain == estimate_memory(shape, 8192, 2)  # tp=1 is the default: nothing changes
    assert plain["weights"] == (split + whole) * 2
    assert halved["weights"] == (split // 2 + whole) * 2  # bf16
    assert halved["gradients"] == (split // 2 + whole) * 2 and halved["optimizer"] == (split // 2 + whole) * 4


def test_tp_divides_the_lora_factors_that_split():
    from peft import LoraConfig, get_peft_model

    config = {**PRESETS["llama3.2-1b"], "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512}
    config.update(num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    model = get_peft_model(
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config)),
        LoraConfig(r=16, target_modules=list(SPLIT)),
    )
    # column-parallel linears split lora_B (output features), row-parallel ones lora_A (input features)
    rowwise = ("o_proj", "down_proj")
    split = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and (("lora_A" in n) == any(r in n for r in rowwise))
    )
    shape = ModelShape.from_config(config)
    assert shape.layers * shape.lora_split_per_layer == split
    lora = estimate_memory(shape, 8192, 4, lora=True, tp=2)
    assert lora["optimizer"] == (shape.lora_params - split // 2) * 8  # AdamW's two float32 moments


def test_tp_communication_per_step():
    shape = ModelShape.from_config(PRESETS["llama3-70b"])
    t = step_times(shape, 131072, 8, 1, GPUS["h100"], 2, 1, lora=True, grad_ckpt=True, tp=4)
    gathered = 65536 * 8192 * 2  # [S_sp, hidden] in bf16 at sp 2
    assert t["tp_bytes"] == 80 * (4 + 4 + 3) * gathered * 3 // 4  # forward, backward, recompute; (tp-1)/tp each
    assert t["tp_s"] == t["tp_bytes"] / 450e9  # NVLink, exposed
    assert step_times(shape, 131072, 8, 1, GPUS["h100"], 8, 1, lora=True, grad_ckpt=True)["tp_bytes"] == 0


def test_layout_recommendation_for_llama3_70b_lora_128k(capsys):
    flags = ["--model", "llama3-70b", "--seq-len", "131072", "--gpus", "8", "--lora"]
    cli([*flags, "--chunked-loss"])
    text = capsys.readouterr().out
    assert "Recommended layout: tp_size=4, sp_size=2, mode=ulysses: SP alone does not fit" in text
    assert "tp_size=8 also fits" in text
    assert text.splitlines()[-1].startswith("Verdict: does NOT fit (chunked_loss)")  # SP alone, as before
    cli(flags)  # plain loss: 4 ways leave too little room for the logits
    assert "Recommended layout: tp_size=8, sp_size=1:" in capsys.readouterr().out
    cli([*flags, "--chunked-loss", "--tp-size", "4"])
    text = capsys.readouterr().out
    assert "Split: tp_size=4 x sp_size=2, mode=ulysses" in text and "TP gather / scatter" in text
    assert text.splitlines()[-1].startswith("Verdict: fits (chunked_loss)")
    cli(["--model", "llama3-8b", "--seq-len", "131072", "--gpus", "8", "--lora"])
    assert "Recommended layout: tp_size=1, sp_size=8, mode=ulysses: SP alone fits" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--model", "llama3-70b", "--tp-size", "3"], "tp_size=3 must divide num_attention_heads=64"),
        (["--model", "qwen3-30b-a3b", "--tp-size", "2"], "mixture of experts"),
        (["--model", "llama3-70b", "--tp-size", "2", "--zero3"], "ZeRO-3 / FSDP with it are not supported"),
        (["--model", "llama3-70b", "--tp-size", "8", "--nodes", "2"], "must divide the 4 GPUs of a node"),
    ],
)
def test_tp_size_refused_with_the_numbers(flags, message):
    with pytest.raises(SystemExit, match=message):
        cli([*flags, "--seq-len", "131072", "--gpus", "8", "--lora"])
