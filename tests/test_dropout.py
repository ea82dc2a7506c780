"""Dropout under SP: each SP rank draws its own masks in a sharded training forward (integrations/rng.py).

Every rank starts from the same seed, as the Trainer seeds every process. Without the fork, rank 1's LoRA dropout
masks equal rank 0's element for element (fraction equal 1.0); with it they agree as two independent draws would
(about 1/2 at p = 0.5), with the plain run's keep rate. What must stay common stays common: the global RNG state
after the step, `generate`'s sampled tokens, gradient checkpointing's recompute (it redraws the forward's masks).
With dropout 0, SP equals plain exactly: tests/test_models.py's LoRA parity runs in training mode, through the fork.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from models_zoo import VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.integrations.rng import ShardedRng, draw_common, fork_seed

P = 0.5  # dropout probability: an equal-mask fraction of 1/2 for independent draws, 1 for repeated ones
SEQ = 64  # one packed row: 32 tokens per rank
SIGMAS = 6  # bounds on Bernoulli fractions: a false failure at 6 sigma is about 1 in 10^9
_GROUPS: dict = {}


def _setup():
    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), mode="ring")
    if "ring" not in _GROUPS:
        _GROUPS["ring"] = hf_seqpar.init_groups(cfg)
    return cfg, _GROUPS["ring"]


def _lora_llama(p: float, checkpointing: str | None = None):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    if checkpointing:
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, lora).train()


def _pack(features):
    ids = torch.cat([f["input_ids"] for f in features])[None]
    pos = torch.cat([torch.arange(len(f["input_ids"])) for f in features])[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}


def _tokens():
    return torch.randint(3, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(5))


class _Masks:
    """Records the keep mask of every LoRA dropout call (output != 0; inputs are nonzero almost surely)."""

    def __init__(self, model):
        self.masks: list[torch.Tensor] = []
        drops = [m for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
        assert drops, "no LoRA dropout modules found"
        self.handles = [d.register_forward_hook(self._hook) for d in drops]

    def _hook(self, module, args, out):
        assert bool((args[0] != 0).all()), "a zero input would read as a dropped element"
        self.masks.append((out != 0).flatten())

    def take(self) -> torch.Tensor:
        flat, self.masks = torch.cat(self.masks), []
        return flat


def _sharded_step(model, batch):
    n = (batch["shift_labels"] != -100).sum()
    dist.all_reduce(n)
    loss = model(**batch, num_items_in_batch=n).loss
    loss.backward()
    return loss.detach()


def _body_masks():
    cfg, groups = _setup()
    model = hf_seqpar.apply_sequence_parallel(_lora_llama(P), config=cfg, groups=groups)
    masks = _Masks(model)
    batch = hf_seqpar.SequenceShardingCollator(_pack, config=cfg, groups=groups)([{"input_ids": _tokens()}])
    torch.manual_seed(1234)  # every rank alike, as the Trainer's set_seed
    _sharded_step(model, batch)
    first, after_step = masks.take(), torch.get_rng_state()
    _sharded_step(model, batch)
    second = masks.take()
    torch.manual_seed(1234)
    _sharded_step(model, batch)
    again = masks.take()
    torch.manual_seed(1234)  # what one draw from the common stream leaves: nothing else in the forward touched it
    draw_common()
    one_draw = torch.get_rng_state()

    plain = _lora_llama(P)  # the plain model on the full row, for the keep rate's distribution
    plain_masks = _Masks(plain)
    torch.manual_seed(1234)
    plain(input_ids=_tokens()[None], labels=_tokens()[None]).loss.backward()
    return {
        "first": first,
        "second": second,
        "again": again,
        "after_step": after_step,
        "one_draw": one_draw,
        "plain": plain_masks.take(),
    }


def _fraction_bound(n: int, q: float) -> float:
    return SIGMAS * math.sqrt(q * (1 - q) / n)


def test_masks_are_drawn_per_rank_with_the_plain_distribution(ranks):
    r0, r1 = ranks.run(_body_masks)
    n = r0["first"].numel()
    assert n == r1["first"].numel() == 2 * 4 * (SEQ // 2) * 64  # layers x LoRA modules x local tokens x hidden
    equal = (r0["first"] == r1["first"]).float().mean().item()
    assert abs(equal - 0.5) < _fraction_bound(n, 0.5), f"fraction of equal masks between ranks {equal:.4f}"
    for name, masks in [("rank 0", r0["first"]), ("rank 1", r1["first"]), ("plain", r0["plain"])]:
        keep = masks.float().mean().item()
        assert abs(keep - (1 - P)) < _fraction_bound(masks.numel(), 1 - P), f"{name} keep rate {keep:.4f}"
    for r in (r0, r1):
        assert torch.equal(r["first"], r["again"]), "the same seed must draw the same masks (reproducible runs)"
        repeat = (r["first"] == r["second"]).float().mean().item()
        assert abs(repeat - 0.5) < _fraction_bound(n, 0.5), f"consecutive steps share masks: {repeat:.4f}"
    assert torch.equal(r0["after_step"], r1["after_step"]), "the global RNG state after the step differs by rank"
    assert torch.equal(r0["after_step"], r0["one_draw"]), "the forward moved the common stream by more than one draw"


def _body_generate():
    cfg, groups = _setup()
    model = hf_seqpar.apply_sequence_parallel(_lora_llama(P), config=cfg, groups=groups)
    collate = hf_seqpar.SequenceShardingCollator(_pack, config=cfg, groups=groups)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(99)
    for step in range(3):
        _sharded_step(model, collate([{"input_ids": _tokens().roll(step)}]))
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)  # the SP group's sum is the plain gradient (API.md)
        optimizer.step()
        optimizer.zero_grad()
    state = torch.get_rng_state()
    # still in training mode: generate's own forwards draw dropout from the common stream, alike on every rank
    out = model.generate(input_ids=_tokens()[None, :6], do_sample=True, max_new_tokens=12, top_k=0, pad_token_id=0)
    lora = torch.cat([p.detach().flatten() for n, p in sorted(model.named_parameters()) if "lora_" in n])
    return state, out, lora


def test_generate_after_training_samples_the_same_tokens_on_every_rank(ranks):
    (state0, out0, lora0), (state1, out1, lora1) = ranks.run(_body_generate)
    assert torch.equal(lora0, lora1), "the SP ranks' adapters diverged"
    assert torch.equal(state0, state1), "the global RNG state after training differs by rank"
    assert out0.shape[1] == 18 and torch.equal(out0, out1), f"sampled tokens differ: {out0} vs {out1}"


def _body_checkpointing(use: str):
    cfg, groups = _setup()
    batch = hf_seqpar.SequenceShardingCollator(_pack, config=cfg, groups=groups)([{"input_ids": _tokens()}])
    grads = {}
    for name, checkpointing, seed in [("off", None, 7), ("on", use, 7), ("off, other seed", None, 8)]:
        model = hf_seqpar.apply_sequence_parallel(_lora_llama(P, checkpointing), config=cfg, groups=groups)
        torch.manual_seed(seed)
        _sharded_step(model, batch)
        grads[name] = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
    scale = grads["off"].abs().max().item()
    return {k: (g - grads["off"]).abs().max().item() / scale for k, g in grads.items()}


@pytest.mark.parametrize("use", ["non-reentrant", "reentrant"])
def test_checkpoint_recompute_redraws_the_forward_masks(ranks, use):
    for rank, err in enumerate(ranks.run(_body_checkpointing, use)):
        # recompute repeats the forward's float32 arithmetic; 1e-6 leaves room for reordered sums only
        assert err["on"] < 1e-6, f"rank {rank}: checkpointed gradient differs by {err['on']:.2e} (other masks?)"
        assert err["off, other seed"] > 1e-2, f"rank {rank}: masks barely matter here ({err['off, other seed']:.2e})"


# ---- ShardedRng alone (one process): the accelerator path, nesting, errors ---------------------------------------


class _FakeDevice:
    """Stands in for torch.cuda's RNG functions on a CPU-only machine: one generator, the 'current device'."""

    def __init__(self):
        self.gen = torch.Generator().manual_seed(42)

    def get_rng_state(self):
        return self.gen.get_state()

    def set_rng_state(self, state):
        self.gen.set_state(state)

    def manual_seed(self, seed):
        self.gen.manual_seed(seed)


def _common_after_one_draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the common CPU state a fork starts from, the state after the join of a forward that drew)."""
    torch.manual_seed(seed)
    start = torch.get_rng_state()
    draw_common()
    return start, torch.get_rng_state()


def _forked_forward(sp_rank: int, device: _FakeDevice) -> dict:
    torch.manual_seed(3)
    rng = ShardedRng(sp_rank, 2, device_rng=lambda: device)
    device_before = device.get_rng_state()
    rng.enter(True)
    rng.enter(True)  # the inner decoder's hook: already forked, nothing changes
    cpu, dev = torch.rand(4), torch.rand(4, generator=device.gen)
    rng.leave()
    inner = torch.rand(4)  # still in the outer forward's stream
    rng.leave()
    return dict(cpu=cpu, dev=dev, inner=inner, device_before=device_before, cpu_after=torch.get_rng_state())


def test_fork_covers_the_accelerator_generator_and_joins_both():
    device0, device1 = _FakeDevice(), _FakeDevice()
    r0, r1 = _forked_forward(0, device0), _forked_forward(1, device1)
    for key in ("cpu", "dev", "inner"):
        assert not torch.equal(r0[key], r1[key]), f"SP ranks drew the same {key} numbers"
    start, joined = _common_after_one_draw(3)
    for rank, r, device in [(0, r0, device0), (1, r1, device1)]:
        assert torch.equal(device.get_rng_state(), r["device_before"]), f"rank {rank}: accelerator state not restored"
        assert torch.equal(r["cpu_after"], joined), f"rank {rank}: CPU state not joined to the common stream"
        device.manual_seed(fork_seed((start, r["device_before"]), rank))
        assert torch.equal(torch.rand(4, generator=device.gen), r["dev"]), f"rank {rank}: not its own seeded fork"


def test_no_fork_when_unsharded_or_alone_and_join_after_an_error():
    device = _FakeDevice()
    for rng, fork in [(ShardedRng(1, 2, lambda: device), False), (ShardedRng(1, 1, lambda: device), True)]:
        torch.manual_seed(3)
        expected = torch.rand(4)
        torch.manual_seed(3)
        rng.enter(fork)
        assert torch.equal(torch.rand(4), expected), "an unforked forward must draw the plain stream"
        rng.leave()
    rng = ShardedRng(1, 2, lambda: device)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError, match="forward failed"):
        rng.enter(True)
        try:
            raise RuntimeError("forward failed")
        finally:
            rng.leave()  # the model's post-hook runs with always_call=True
    # joined after the error; the forward drew nothing (dropout 0), so the common state is the plain run's exactly
    assert torch.equal(torch.get_rng_state(), _common_after_one_draw(3)[0])
