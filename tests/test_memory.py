"""Memory beyond SP (chunked loss, tiled MLP, checkpoint offload): each exact against the plain path.

References: the unmodified model (same seed) run the plain way, its loss and every parameter gradient; for the loss
kernel alone, the textbook log-softmax in float64. Everything runs in float32 on CPU; chunk sizes are chosen so that
chunks do not divide the sequence. Tolerances: float32 rounding of the same per-token math summed in another order.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_launch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from models_zoo import _COMMON, VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.integrations.memory import STATE_ATTR, apply_memory_savings, remove_memory_savings
from hf_seqpar.memory import chunked_target_log_probs, tiled_apply

LOSS_ATOL = 2e-6  # float32 loss of order 5, the same token terms summed in another order
GRAD_ATOL = 2e-6  # float32 gradients of order 1e-3 .. 1e-1, chunk partial sums added in another order
SMALL = dict(loss_chunk_tokens=7, mlp_chunk_tokens=9, offload_min_bytes=0)  # many chunks, every saved tensor moved
ALL = dict(chunked_loss=True, tiled_mlp=True, offload_checkpoints=True)
ROOT = Path(__file__).resolve().parents[1]
# The launch tests' fixtures (tiny model, tokenizer, data; the plain runs), registered here under their own names.
assets, plain_trainer_log, plain_sft_logs = (
    test_launch.assets,
    test_launch.plain_trainer_log,
    test_launch.plain_sft_logs,
)


def _model(family: str, *, ckpt=False, lora=False, **extra):
    if family in ("cohere", "granite"):  # logit post-processing: scale / divide, checked against the plain forward
        cls = transformers.CohereConfig if family == "cohere" else transformers.GraniteConfig
        extra = {"logit_scale": 0.5} if family == "cohere" else {"logits_scaling": 3.0}
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cls(**_COMMON, **extra), attn_implementation="eager")
    elif family == "llama_tied":
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{**_COMMON, "tie_word_embeddings": True})
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        model = tiny_model(family)
    model = model.float().train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj", "gate_proj", "down_proj"] + (["lm_head"] if lora == "lm_head" else [])
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    return model


def _batch(seq=40, rows=2):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    labels[-1, -4:] = -100  # padding
    return ids, labels


def _step(model, ids, labels, **kwargs):
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same(ref, got, ref_grads, got_grads):
    assert abs(ref.loss.item() - got.loss.item()) < LOSS_ATOL, (ref.loss.item(), got.loss.item())
    assert sorted(ref_grads) == sorted(got_grads)
    bad = {n: (ref_grads[n] - got_grads[n]).abs().max().item() for n in ref_grads}
    assert all(v < GRAD_ATOL for v in bad.values()), {n: v for n, v in bad.items() if v >= GRAD_ATOL}


# ---- the loss kernel alone ---------------------------------------------------------------------------------------


def test_chunked_log_probs_match_float64_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(2, 23, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 23))
    targets[0, :5] = -100
    upstream = torch.randn(2, 23)
    got = chunked_target_log_probs(hidden, targets, lambda h: F.linear(h, weight), [weight], chunk_tokens=5)
    torch.autograd.backward(got, upstream)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logp = F.log_softmax(F.linear(h64, w64), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref = torch.where(targets != -100, logp, 0.0)
    torch.autograd.backward(ref, upstream.double())
    assert torch.allclose(got.double(), ref, atol=1e-5)  # float32 logsumexp over 50 logits of order 10
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-5)
    assert torch.allclose(weight.grad.double(), w64.grad, atol=1e-5)
    assert (got[0, :5] == 0).all() and (hidden.grad[0, :5] == 0).all()  # ignored targets: no loss, no gradient


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path():
    torch.manual_seed(0)
    hidden = torch.randn(37, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 64, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain path: bf16 logits, float() for the loss
        ref = -F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
        got = chunked_target_log_probs(
            hidden, targets, lambda h: F.linear(h, weight).float(), [weight], chunk_tokens=8
        )
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight))
    got_grads = torch.autograd.grad(got.sum(), (hidden, weight))  # backward outside autocast, as a Trainer does
    assert torch.allclose(got, ref, atol=1e-5)  # same bf16 logits; float32 logsumexp in another order
    for g, r in zip(got_grads, ref_grads, strict=True):  # bf16 products: 2^-8 relative
        assert torch.allclose(g, r, rtol=1e-2, atol=1e-2 * r.abs().max().item())


def test_bf16_weight_gradient_is_summed_over_chunks_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(1200, 16, dtype=torch.bfloat16)
    weight = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (1200,))
    got = chunked_target_log_probs(hidden, targets, lambda h: F.linear(h, weight).float(), [weight], chunk_tokens=4)
    got.sum().backward()
    w64 = weight.detach().double().requires_grad_()
    ref = F.log_softmax(F.linear(hidden.double(), w64), -1).gather(-1, targets[:, None]).sum()
    ref.backward()
    error = (weight.grad.double() - w64.grad).norm() / w64.grad.norm()
    assert error < 2**-8, (
        error
    )  # the plain path's own bf16 error is 2.2e-3; 300 partial sums kept in bf16 reach 1.8e-2


def test_tiled_apply_is_the_function_and_recomputes_per_chunk():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(2, 19, 8, requires_grad=True)
    calls = []
    mlp[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    ref_grads = torch.autograd.grad(mlp(x).square().sum(), [x, *mlp.parameters()])
    calls.clear()
    got = tiled_apply(mlp, x, chunk_tokens=4)
    assert calls == [4, 4, 4, 4, 3]
    got_grads = torch.autograd.grad(got.square().sum(), [x, *mlp.parameters()])
    assert calls == [4, 4, 4, 4, 3] + [3, 4, 4, 4, 4]  # each chunk once more in backward, last first
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-6)


# ---- models, one process -----------------------------------------------------------------------------------------

# One family per kind of logit post-processing (none + tied embeddings, softcap, scale, divide, MoE) in the default
# suite; the other model types of LOGIT_POSTPROCESSING behind `slow`.
CHUNKED_LOSS_FAMILIES = ["llama_tied", "gemma2", "cohere", "granite", "gpt_oss"] + [
    pytest.param(family, marks=pytest.mark.slow)
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "olmo2")
]


@pytest.mark.parametrize("family", CHUNKED_LOSS_FAMILIES)
def test_chunked_loss_matches_the_model_loss(family):
    ids, labels = _batch()
    ref, ref_grads = _step(_model(family), ids, labels, num_items_in_batch=torch.tensor(61))
    model = apply_memory_savings(_model(family), hf_seqpar.SeqParConfig(chunked_loss=True), **SMALL)
    got, got_grads = _step(model, ids, labels, num_items_in_batch=torch.tensor(61))
    assert got.logits is None  # nothing of size [tokens, vocab] was returned
    _assert_same(ref, got, ref_grads, got_grads)


def test_chunked_loss_keeps_mean_shift_labels_ignore_index_and_eval():
    ids, labels = _batch()
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shift[1, 3] = 7  # different from what shifting would give: only honoured if shift_labels is read
    cfg = hf_seqpar.SeqParConfig(chunked_loss=True)
    five = labels.masked_fill(labels == -100, 5)
    for rows, kwargs in ((labels, {}), (labels, {"shift_labels": shift}), (five, {"ignore_index": 5})):
        ref, ref_grads = _step(_model("llama"), ids, rows, **kwargs)
        got, got_grads = _step(apply_memory_savings(_model("llama"), cfg, **SMALL), ids, rows, **kwargs)
        _assert_same(ref, got, ref_grads, got_grads)
    model = apply_memory_savings(_model("llama").eval(), cfg)
    with torch.no_grad():  # evaluation needs logits: the model's own forward
        plain = _model("llama").eval()(input_ids=ids, labels=labels)
        out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and torch.equal(out.logits, plain.logits) and torch.equal(out.loss, plain.loss)


@pytest.mark.parametrize(
    "ckpt,lora",
    [(False, False), (True, True), (True, "lm_head")]
    + [pytest.param(*case, marks=pytest.mark.slow) for case in ((False, True), (False, "lm_head"), (True, False))],
)
def test_all_savings_together_match_the_plain_step(ckpt, lora):
    ids, labels = _batch()
    ref, ref_grads = _step(_model("llama", ckpt=ckpt, lora=lora), ids, labels, num_items_in_batch=torch.tensor(61))
    config = hf_seqpar.SeqParConfig(**{**ALL, "offload_checkpoints": ckpt})  # offload needs checkpointing
    model = apply_memory_savings(_model("llama", ckpt=ckpt, lora=lora), config, **SMALL)
    base = model.get_base_model() if lora else model
    mlp_rows = []
    base.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: mlp_rows.append(i[0].shape[1]))
    got, got_grads = _step(model, ids, labels, num_items_in_batch=torch.tensor(61))
    _assert_same(ref, got, ref_grads, got_grads)
    assert max(mlp_rows) == 9  # the MLP saw chunks of 9 tokens, never the 40
    state = getattr(base, STATE_ATTR)
    assert (state.offloader is not None and state.offloader.offloaded_bytes > 0) == ckpt


def test_savings_are_undone_and_refused_with_reasons():
    model = _model("llama")
    apply_memory_savings(model, hf_seqpar.SeqParConfig(**ALL))
    assert "forward" in vars(model) and "forward" in vars(model.model.layers[0].mlp)
    ids, labels = _batch()
    with pytest.raises(RuntimeError, match="^hf_seqpar: this LlamaForCausalLM is a copy"):
        copy.deepcopy(model)(input_ids=ids, labels=labels)
    remove_memory_savings(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.model) and not hasattr(model, STATE_ATTR)

    model = apply_memory_savings(_model("llama"), hf_seqpar.SeqParConfig(offload_checkpoints=True))
    with pytest.raises(ValueError, match="^hf_seqpar: offload_checkpoints .* gradient checkpointing is off"):
        model(input_ids=ids, labels=labels)
    with pytest.raises(NotImplementedError, match="^hf_seqpar: tiled_mlp tiles dense MLPs"):
        apply_memory_savings(_model("gpt_oss"), hf_seqpar.SeqParConfig(tiled_mlp=True))
    moe = _model("gpt_oss")
    moe.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="^hf_seqpar: .*output_router_logits=True"):
        apply_memory_savings(moe, hf_seqpar.SeqParConfig(chunked_loss=True))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(NotImplementedError, match="^hf_seqpar: chunked_loss does not know how GPT2LMHeadModel"):
        apply_memory_savings(gpt2, hf_seqpar.SeqParConfig(chunked_loss=True))
    assert "forward" not in vars(gpt2)  # a refusal leaves the model untouched


def test_trl_fused_lm_head_calls_pass_through():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    ids, labels = _batch()
    outs = []
    for savings in (False, True):
        model = _model("llama")
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer does
        if savings:
            apply_memory_savings(model, hf_seqpar.SeqParConfig(chunked_loss=True, tiled_mlp=True), **SMALL)
        outs.append(_step(model, ids, labels, fused_lm_head=True))
    (ref, ref_grads), (got, got_grads) = outs
    assert torch.equal(ref.entropy, got.entropy) and torch.equal(ref.is_top1, got.is_top1)
    _assert_same(ref, got, ref_grads, got_grads)


# ---- under sequence parallelism (gloo ranks) ---------------------------------------------------------------------

_GROUPS: dict = {}


def _body_sp_parity(ckpt: bool, lora: bool):
    savings = {**ALL, "offload_checkpoints": ckpt}
    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), mode="ring", **savings)
    groups = _GROUPS.setdefault(dist.get_world_size(), hf_seqpar.init_groups(cfg))
    ids, labels = _batch(seq=44)
    n_total = int((labels[:, 1:] != -100).sum())
    ref, ref_grads = _step(
        _model("llama", ckpt=ckpt, lora=lora), ids, labels, num_items_in_batch=torch.tensor(n_total)
    )

    model = _model("llama", ckpt=ckpt, lora=lora)
    hf_seqpar.apply_sequence_parallel(model, config=cfg, groups=groups)
    apply_memory_savings(model, cfg, **SMALL)
    collator = hf_seqpar.SequenceShardingCollator(
        lambda _: {"input_ids": ids, "labels": labels}, config=cfg, groups=groups
    )
    batch = collator([None])
    out = model(**batch, num_items_in_batch=torch.tensor(n_total))
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)  # the group's shares add up to the plain loss
    errors = {"loss": abs(loss.item() - ref.loss.item())}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.clone()
            dist.all_reduce(grad)
            errors[name] = (grad - ref_grads[name]).abs().max().item()
    return errors, out.logits is None


@pytest.mark.parametrize("ckpt,lora", [(False, False), (True, True)])
def test_savings_under_sequence_parallelism(ranks, ckpt, lora):
    for errors, no_logits in ranks.run(_body_sp_parity, ckpt, lora):
        assert no_logits
        assert errors.pop("loss") < LOSS_ATOL
        assert max(errors.values()) < GRAD_ATOL, {k: v for k, v in errors.items() if v >= GRAD_ATOL}


# ---- configuration and activation --------------------------------------------------------------------------------


def test_config_fields_env_and_launcher_section(tmp_path):
    cfg = hf_seqpar.SeqParConfig(sp_size=2, chunked_loss=True, offload_checkpoints=True)
    assert cfg.memory_savings == ("chunked_loss", "offload_checkpoints")
    env = cfg.to_env()
    assert env["HF_SEQPAR_CHUNKED_LOSS"] == "true" and "HF_SEQPAR_TILED_MLP" not in env
    assert hf_seqpar.SeqParConfig.from_env(env) == cfg
    assert hf_seqpar.SeqParConfig.from_env({"HF_SEQPAR_TILED_MLP": "1"}).tiled_mlp
    with pytest.raises(ValueError, match="HF_SEQPAR_TILED_MLP='maybe'"):
        hf_seqpar.SeqParConfig.from_env({"HF_SEQPAR_TILED_MLP": "maybe"})
    with pytest.raises(ValueError, match="chunked_loss='yes' must be True or False"):
        hf_seqpar.SeqParConfig(chunked_loss="yes")
    from hf_seqpar.integrations.launch import read_config_file

    path = tmp_path / "accelerate.yaml"
    path.write_text("num_processes: 1\nhf_seqpar:\n  sp_size: 1\n  chunked_loss: true\n  tiled_mlp: true\n")
    assert read_config_file(path)[0] == hf_seqpar.SeqParConfig(chunked_loss=True, tiled_mlp=True)


def test_plugin_prepare_applies_the_savings_at_sp_size_1():
    from types import SimpleNamespace

    model = _model("llama")
    plugin = hf_seqpar.SequenceParallelPlugin(hf_seqpar.SeqParConfig(chunked_loss=True, tiled_mlp=True))
    (prepared,) = plugin.prepare(SimpleNamespace(prepare=lambda *objects: objects), model)
    assert prepared is model and getattr(model, STATE_ATTR).config.memory_savings == ("chunked_loss", "tiled_mlp")


_SCRIPT = """
import sys, torch, transformers
sys.path.insert(0, {tests!r})
from models_zoo import VOCAB, tiny_model
from hf_seqpar.integrations.memory import STATE_ATTR, remove_memory_savings

ids = torch.randint(3, VOCAB, (8, 33), generator=torch.Generator().manual_seed(0))
data = [{{"input_ids": row, "labels": row}} for row in ids]
args = dict(output_dir={out!r}, max_steps=2, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
            report_to="none", use_cpu=True, gradient_checkpointing=True, logging_steps=1, disable_tqdm=True)
losses = []
for savings in (True, False):
    model = tiny_model("llama")
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=data)
    assert hasattr(model, STATE_ATTR)  # the hook of `python -m hf_seqpar` switched the savings on
    if not savings:
        remove_memory_savings(model)
    trainer.train()
    losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
print("LOSSES", losses)
assert all(abs(a - b) < 1e-5 for a, b in zip(*losses)), losses
"""


@pytest.mark.slow  # the one-GPU recipe's --tiny launch covers `hf-seqpar launch` at sp_size=1 with savings
def test_python_m_hf_seqpar_switches_savings_on_at_sp_size_1(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "out"))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_SEQPAR_")}
    env.update(HF_SEQPAR_CHUNKED_LOSS="true", HF_SEQPAR_TILED_MLP="true", HF_SEQPAR_OFFLOAD_CHECKPOINTS="true")
    done = subprocess.run(
        [sys.executable, "-m", "hf_seqpar", str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (
        "sp_size=1, sequence parallelism is off; memory savings on: chunked_loss, tiled_mlp, offload_checkpoints"
        in (done.stdout)
    )


# ---- end to end, unmodified scripts under `hf-seqpar launch` (slow) ----------------------------------------------


@pytest.mark.slow
def test_trainer_script_with_savings_under_sp_matches_plain_run(request):
    from test_launch import assert_same_curve, launch_sp, train_cmd

    launch = request.getfixturevalue("assets")
    out = launch.root / "sp_trainer_savings"
    section = {"sp_size": 2, "mode": "ring", "chunked_loss": True, "tiled_mlp": True}
    launch_sp(launch, f"{out.name}_launch", 2, section, train_cmd(launch, out, "--log_file", out / "log.json"))
    plain = request.getfixturevalue("plain_trainer_log")
    assert_same_curve(json.loads((out / "log.json").read_text()), plain)  # eval losses included


@pytest.mark.slow
def test_trl_sft_script_with_savings_under_sp_matches_plain_run(request):
    from test_launch import assert_same_curve, launch_sp, sft_cmd, trl_log

    launch = request.getfixturevalue("assets")
    out = launch.root / "sp_sft_savings"
    cmd = sft_cmd(launch, out, False)
    cmd[cmd.index("--gradient_checkpointing") + 1] = "True"  # recomputation is exact; offload needs it
    section = {"sp_size": 2, "mode": "ring", "chunked_loss": True, "tiled_mlp": True, "offload_checkpoints": True}
    launch_sp(launch, f"{out.name}_launch", 2, section, cmd)
    assert_same_curve(trl_log(out), request.getfixturevalue("plain_sft_logs")(False))
