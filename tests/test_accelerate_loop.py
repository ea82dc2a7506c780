"""An unmodified accelerate loop gains exact SP; every SeqParConfig field takes effect through
`apply_sequence_parallel`; a second activation / apply with another config wins.

References: the plain model (same seed) run the plain way, its loss value and every parameter gradient; for the
launched script, the same script run as `python script.py` (plain DDP under torchrun where dp > 1).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import test_launch
import torch
import torch.distributed as dist
from test_memory import ALL, _batch, _model

import hf_seqpar
from hf_seqpar.integrations.memory import STATE_ATTR as MEMORY_ATTR
from hf_seqpar.integrations.transformers import STATE_ATTR

LOSS_ATOL = 2e-6  # float32 loss of order 5: the same token terms summed in another order
GRAD_ATOL = 2e-6  # float32 gradients of order 1e-3 .. 1e-1, shard partials summed in another order
LAUNCH_RTOL = 1e-5  # float32 per-step loss / grad_norm of the launched loop (observed: 2e-7)
SCRIPT = test_launch.ROOT / "tests" / "scripts" / "accelerate_plain_loop.py"
assets = test_launch.assets  # the launch tests' tiny model and data, under its own name here
_GROUPS: dict = {}


def _groups(cfg):
    return _GROUPS.setdefault(dist.get_world_size(), hf_seqpar.init_groups(cfg))


def _plain(ids, labels, **kwargs):
    model = _model("llama", **kwargs)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _world_mean_grads(model) -> dict:
    """The gradient DDP leaves on every rank: the mean over the world."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.clone()
            dist.all_reduce(grad)
            grads[name] = grad / dist.get_world_size()
    return grads


def _errors(grads, ref_grads) -> float:
    return max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)


# ---- A: the loop's own `model(**batch).loss`, one micro-batch in the rank pool -----------------------------------


def _body_loop_loss(mode: str):
    from hf_seqpar.integrations.accelerator import switch_for_loop

    cfg = hf_seqpar.SeqParConfig(sp_size=2, mode=mode)
    groups = _groups(cfg)
    ids, labels = _batch(seq=44)
    ref_loss, ref_grads = _plain(ids, labels)  # the plain loop: the mean over the micro-batch's targets

    model = _model("llama")
    loader = torch.utils.data.DataLoader([0], collate_fn=lambda _: {"input_ids": ids, "labels": labels})
    switch_for_loop((model, loader), cfg, groups)
    batch = next(iter(loader))
    loss = model(**batch).loss  # what an unmodified script backpropagates
    loss.backward()
    result = {"value": abs(loss.item() - ref_loss), "grad": _errors(_world_mean_grads(model), ref_grads)}

    refusals = []
    for kwargs in ({"input_ids": ids, "labels": labels}, {k: v for k, v in batch.items() if "labels" not in k}):
        try:
            model(**kwargs)
        except RuntimeError as err:
            refusals.append(str(err))
    model.eval()
    with torch.no_grad():  # an eval forward of whole rows (generate, a prompt): the original attention
        whole = model(input_ids=ids, labels=labels).loss.item()
    result.update(refusals=refusals, whole=abs(whole - ref_loss))
    return result


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_loop_loss_value_and_gradient_equal_the_plain_loop(ranks, mode):
    for result in ranks.run(_body_loop_loss, mode):
        assert result["value"] < LOSS_ATOL and result["whole"] < LOSS_ATOL, result
        assert result["grad"] < GRAD_ATOL, result
        unsharded, logits_only = result["refusals"]
        assert unsharded.startswith("hf_seqpar: LlamaForCausalLM is sequence parallel, but this training forward")
        assert logits_only.startswith("hf_seqpar: a sequence-parallel forward of LlamaForCausalLM without labels")


# ---- B and C: apply_sequence_parallel takes every field; a second apply wins ------------------------------------


def _installed(base) -> list[bool]:
    """Which savings' forwards sit on the model: chunked loss (causal LM), tiled MLP (a layer's MLP), offload."""
    return ["forward" in vars(module) for module in (base, base.model.layers[0].mlp, base.model)]


def _body_apply_with_savings():
    cfg = hf_seqpar.SeqParConfig(sp_size=2, mode="ring", **ALL)
    groups = _groups(cfg)
    ids, labels = _batch(seq=44)
    ref_loss, ref_grads = _plain(ids, labels, ckpt=True, lora=True)
    n_total = torch.tensor(int((labels[:, 1:] != -100).sum()))

    def step(model, config):
        model.zero_grad()
        collator = hf_seqpar.SequenceShardingCollator(
            lambda _: {"input_ids": ids, "labels": labels}, config=config, groups=groups
        )
        out = model(**collator([None]), num_items_in_batch=n_total)
        out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)  # the group's shares add up to the plain loss
        grads = _world_mean_grads(model)
        grads = {n: g * dist.get_world_size() for n, g in grads.items()}  # API.md: the group's sum
        return {"loss": abs(loss.item() - ref_loss), "grad": _errors(grads, ref_grads), "logits": out.logits is None}

    model = _model("llama", ckpt=True, lora=True)
    hf_seqpar.apply_sequence_parallel(model, config=cfg, groups=groups)  # the one call, no apply_memory_savings
    base = model.get_base_model()
    savings = getattr(base, MEMORY_ATTR)
    savings.offloader.min_bytes = 0  # the tiny model's checkpoints are below the default 1 MiB worth a copy
    first = step(model, cfg)
    first.update(
        savings=savings.config.memory_savings,
        installed=_installed(base),
        offloaded=savings.offloader.offloaded_bytes,
    )
    cfg2 = hf_seqpar.SeqParConfig(sp_size=2, mode="ulysses", tiled_mlp=True)
    hf_seqpar.apply_sequence_parallel(model, config=cfg2, groups=groups)  # the second config wins, savings too
    second = step(model, cfg2)
    second.update(
        savings=getattr(base, MEMORY_ATTR).config.memory_savings,
        installed=_installed(base),
        mode=getattr(base, STATE_ATTR).config.mode,
    )
    return first, second


def test_apply_sequence_parallel_switches_every_field_and_a_second_apply_wins(ranks):
    for first, second in ranks.run(_body_apply_with_savings):
        assert first["loss"] < LOSS_ATOL and first["grad"] < GRAD_ATOL, first
        assert first["savings"] == ("chunked_loss", "tiled_mlp", "offload_checkpoints")
        assert first["installed"] == [True, True, True] and first["offloaded"] > 0 and first["logits"]
        assert second["loss"] < LOSS_ATOL and second["grad"] < GRAD_ATOL, second
        assert second["savings"] == ("tiled_mlp",) and second["mode"] == "ulysses"
        assert second["installed"] == [False, True, False] and not second["logits"]


def test_apply_sequence_parallel_at_sp_size_1_takes_the_savings():
    groups = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
    ids, labels = _batch()
    ref_loss, ref_grads = _plain(ids, labels)
    model = _model("llama")
    cfg = hf_seqpar.SeqParConfig(sp_size=1, chunked_loss=True, tiled_mlp=True)
    hf_seqpar.apply_sequence_parallel(model, config=cfg, groups=groups)
    assert getattr(model, MEMORY_ATTR).config.memory_savings == ("chunked_loss", "tiled_mlp")
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None and abs(out.loss.item() - ref_loss) < LOSS_ATOL
    assert _errors({n: p.grad for n, p in model.named_parameters()}, ref_grads) < GRAD_ATOL


@pytest.fixture
def stub_prepare(monkeypatch):
    """Trainer.__init__ and the accelerate bindings as they were; Accelerator.prepare a stub returning its objects."""
    import accelerate.accelerator
    import accelerate.data_loader
    from accelerate import Accelerator
    from transformers import Trainer

    for owner, name in ((Trainer, "__init__"), (accelerate.accelerator, "prepare_data_loader")):
        monkeypatch.setattr(owner, name, owner.__dict__[name])
    monkeypatch.setattr(accelerate.data_loader, "prepare_data_loader", accelerate.data_loader.prepare_data_loader)
    monkeypatch.setattr(Accelerator, "prepare", lambda self, *args, device_placement=None: args)
    return Accelerator


def test_activate_again_with_another_config_wins(stub_prepare):
    from transformers import Trainer

    from hf_seqpar.integrations.activate import activate
    from hf_seqpar.integrations.patches import KEY_ATTR, ORIGINAL_ATTR

    original_init, original_prepare = Trainer.__init__, stub_prepare.prepare
    activate(hf_seqpar.SeqParConfig(sp_size=1, chunked_loss=True))
    (model,) = stub_prepare.prepare(SimpleNamespace(), _model("llama"))  # an accelerate loop's prepare
    assert getattr(model, MEMORY_ATTR).config.memory_savings == ("chunked_loss",)
    sp2 = hf_seqpar.SeqParConfig(sp_size=2, mode="ring")
    activate(sp2)
    assert getattr(Trainer.__init__, KEY_ATTR) == ("trainer", sp2)  # not the sp_size=1 memory hook kept silently
    assert getattr(Trainer.__init__, ORIGINAL_ATTR) is original_init  # replaced, not stacked
    assert getattr(stub_prepare.prepare, KEY_ATTR) == ("accelerator", sp2)
    assert getattr(stub_prepare.prepare, ORIGINAL_ATTR) is original_prepare
    activate(hf_seqpar.SeqParConfig(sp_size=1, tiled_mlp=True))
    (model,) = stub_prepare.prepare(SimpleNamespace(), _model("llama"))
    assert getattr(model, MEMORY_ATTR).config.memory_savings == ("tiled_mlp",)
    assert getattr(Trainer.__init__, KEY_ATTR)[0] == "memory"
    activate(hf_seqpar.SeqParConfig(sp_size=1))  # nothing to do: every hook goes
    assert Trainer.__init__ is original_init and stub_prepare.prepare is original_prepare


# ---- A end to end: the unmodified script under hf-seqpar launch ------------------------------------------------


def _loop_args(assets, out, *extra) -> list:
    args = [SCRIPT, "--model_dir", assets.model, "--train_file", assets.data / "train.jsonl"]
    return [*args, "--eval_file", assets.data / "test.jsonl", "--log_file", out / "log.json", *extra]


def _plain_loop_log(assets, name: str, *extra, processes: int = 1) -> dict:
    """The script run without hf_seqpar: one process, or plain DDP under torchrun."""
    out = assets.root / name
    if processes > 1:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        test_launch._run([*run, *_loop_args(assets, out, *extra)], assets, out, ACCELERATE_USE_CPU="1")
    else:
        test_launch._run([sys.executable, *_loop_args(assets, out, *extra)], assets, out)
    return json.loads((out / "log.json").read_text())


@pytest.fixture(scope="session")
def plain_loop_logs(assets):
    logs = {}

    def get(precision: str) -> dict:
        if precision not in logs:
            logs[precision] = _plain_loop_log(assets, f"plain_loop_{precision}", "--mixed_precision", precision)
        return logs[precision]

    return get


def _rows(log: dict) -> dict[str, list[float]]:
    return {
        "micro_loss": [r["local"] for r in log["micro"]],
        "micro_loss_gathered": [r["gathered"] for r in log["micro"]],
        "grad_norm": [r["grad_norm"] for r in log["steps"]],
        "lr": [r["lr"] for r in log["steps"]],
        "eval_loss": [log["eval_loss"]],
    }


def _worst(got: dict, want: dict) -> dict[str, float]:
    """Worst relative difference per quantity (same number of rows required)."""
    got, want = _rows(got), _rows(want)
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items()}
    return {k: max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got[k], want[k], strict=True)) for k in want}


@pytest.mark.parametrize(
    ("mode", "precision"),
    # make test keeps the bf16 launch; fp32 exactness of the same loop stays in the pool tests above
    [
        pytest.param("ring", "no", marks=pytest.mark.slow),
        ("ring", "bf16"),
        pytest.param("ulysses", "no", marks=pytest.mark.slow),
    ],
)
def test_unmodified_accelerate_loop_under_launch_matches_plain_run(assets, plain_loop_logs, mode, precision):
    """2 micro-batches per optimizer step (accelerator.accumulate), clip_grad_norm_, a linear schedule, an eval loop
    with gather_for_metrics; the script never imports hf_seqpar."""
    out = assets.root / f"sp_loop_{mode}_{precision}"
    out.mkdir()
    args = _loop_args(assets, out, "--mixed_precision", precision)
    stdout = test_launch.launch_sp(assets, f"{out.name}_launch", 2, {"sp_size": 2, "mode": mode}, args)
    startup = [line for line in stdout.splitlines() if line.startswith("hf_seqpar: world")]
    assert len(startup) == 1 and "world 2 = DP 1 x SP 2" in startup[0] and f"mode {mode}" in startup[0], stdout
    got, plain = json.loads((out / "log.json").read_text()), plain_loop_logs(precision)
    assert len(plain["steps"]) == 4 and len(plain["micro"]) == 8
    worst = _worst(got, plain)
    if precision == "no":
        assert max(worst.values()) <= LAUNCH_RTOL, worst
    else:
        # bf16 autocast: within 4x what bf16 itself changes in the plain run (plain bf16 vs plain float32), per key
        effect = _worst(plain, plain_loop_logs("no"))
        assert all(worst[k] <= 4 * max(effect[k], 1e-6) for k in worst), (worst, effect)


@pytest.mark.slow
def test_unmodified_accelerate_loop_dp2_sp2_matches_plain_ddp(assets):
    plain = _plain_loop_log(assets, "plain_loop_dp2", "--rows", "32", processes=2)
    out = assets.root / "sp_loop_dp2"
    out.mkdir()
    args = _loop_args(assets, out, "--rows", "32")
    stdout = test_launch.launch_sp(assets, "sp_loop_dp2_launch", 4, {"sp_size": 2, "mode": "ring"}, args)
    assert "world 4 = DP 2 x SP 2" in stdout
    worst = _worst(json.loads((out / "log.json").read_text()), plain)
    assert max(worst.values()) <= LAUNCH_RTOL, worst


@pytest.mark.slow
def test_unmodified_accelerate_loop_tp2_sp2_matches_plain_run(assets, plain_loop_logs):
    """tp_size in the section: DDP keeps the split weights out, clip_grad_norm_ measures the whole model."""
    out = assets.root / "tp_loop"
    out.mkdir()
    args = _loop_args(assets, out, "--mixed_precision", "no")
    section = {"sp_size": 2, "tp_size": 2, "mode": "ring"}
    stdout = test_launch.launch_sp(assets, "tp_loop_launch", 4, section, args)
    assert "world 4 = DP 1 x SP 2 (ulysses 1 x ring 2) x TP 2" in stdout
    worst = _worst(json.loads((out / "log.json").read_text()), plain_loop_logs("no"))
    assert max(worst.values()) <= LAUNCH_RTOL, worst
