"""What the model integration refuses, with clear messages, and the edge cases it must compute exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers
from models_zoo import VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.integrations.loss import token_weighted_mean

SINGLE = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
CFG1 = hf_seqpar.SeqParConfig(sp_size=1, mode="ring")


def _collate(ids):
    return hf_seqpar.SequenceShardingCollator(lambda f: {"input_ids": ids, "labels": ids}, config=CFG1, groups=SINGLE)(
        []
    )


def test_non_interface_model_is_refused_by_name():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    )
    with pytest.raises(NotImplementedError, match="BloomForCausalLM does not route attention"):
        hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)


def test_recurrent_layers_are_refused():
    config = transformers.Qwen3NextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match=r"Qwen3NextForCausalLM has layers of type \['linear_attention'\]"):
        hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)


def test_prompt_learning_peft_is_refused():
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(NotImplementedError, match="virtual tokens"):
        hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)


def test_ulysses_head_constraint_is_checked_when_applying():
    groups = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=3, dp_group=None, dp_rank=0, dp_size=1)
    config = hf_seqpar.SeqParConfig(sp_size=3, mode="ulysses")
    with pytest.raises(ValueError, match=r"sp_size=3 .*num_attention_heads=4.*mode='ring'"):
        hf_seqpar.apply_sequence_parallel(tiny_model("llama"), config=config, groups=groups)


def test_attention_dropout_is_refused():
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)
    with pytest.raises(NotImplementedError, match="dropout=0.1"):
        model(**_collate(torch.randint(3, VOCAB, (1, 16))))


def test_sp_size_one_equals_the_plain_model():
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = tiny_model("mistral")(input_ids=ids, labels=ids).loss
    model = hf_seqpar.apply_sequence_parallel(tiny_model("mistral"), config=CFG1, groups=SINGLE)
    batch = _collate(ids)
    n = (batch["shift_labels"] != -100).sum()
    # float32 model, same math in a different kernel order
    torch.testing.assert_close(model(**batch, num_items_in_batch=n).loss, plain, rtol=1e-5, atol=1e-6)


def _body_empty_shard(mode):
    """Only the first quarter of the sequence has targets: under zigzag on 2 ranks (chunks 0,3 | 1,2), a
    prompt-masked row leaves rank 1 without any valid label. Its loss must be 0 (not NaN) with zero-size grads,
    and the group's sum must still equal the plain loss."""
    cfg = hf_seqpar.SeqParConfig(sp_size=2, mode=mode)
    groups = hf_seqpar.init_groups(cfg)
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, 9:] = -100
    plain_model, model = tiny_model("llama"), tiny_model("llama")
    plain = plain_model(input_ids=ids, labels=labels).loss
    plain.backward()
    hf_seqpar.apply_sequence_parallel(model, config=cfg, groups=groups)
    batch = hf_seqpar.SequenceShardingCollator(
        lambda f: {"input_ids": ids, "labels": labels}, config=cfg, groups=groups
    )([])
    n_local = (batch["shift_labels"] != -100).sum()
    n = n_local.clone()
    dist.all_reduce(n)
    loss = model(**batch, num_items_in_batch=n).loss
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    loss_sum_local = model(**batch, num_items_in_batch=torch.tensor(1)).loss.detach()
    mean = token_weighted_mean(loss_sum_local, n_local, group=groups.sp_group)
    return int(n_local), loss.item(), grads_finite, abs(summed.item() - plain.item()), abs(mean.item() - plain.item())


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_shard_without_valid_labels(ranks, mode):
    results = ranks.run(_body_empty_shard, mode)
    assert min(r[0] for r in results) == 0, "the setup must leave one rank without targets"
    for n_local, loss, finite, err_sum, err_mean in results:
        assert finite and loss == loss, "NaN on a rank without targets"
        if n_local == 0:
            assert loss == 0.0
        assert err_sum < 1e-5 and err_mean < 1e-5  # float32 loss of order 4


def _body_collectives_per_forward(mode):
    """A model forward under SP runs only its attention collectives: no per-layer all-gather of position_ids or of
    anything else (the document boundaries come with the batch)."""
    cfg = hf_seqpar.SeqParConfig(sp_size=2, mode=mode)
    groups = hf_seqpar.init_groups(cfg)
    model = hf_seqpar.apply_sequence_parallel(tiny_model("mistral"), config=cfg, groups=groups)
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    batch = hf_seqpar.SequenceShardingCollator(lambda f: {"input_ids": ids}, config=cfg, groups=groups)([])
    calls: dict[str, int] = {}
    names = (
        "all_gather",
        "all_gather_single",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_reduce",
        "broadcast",
        "all_to_all_single",
        "batch_isend_irecv",
        "reduce_scatter_single",
    )
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def counting(name):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return originals[name](*args, **kwargs)

        return wrapped

    try:
        for name in originals:
            setattr(dist, name, counting(name))
        with torch.no_grad():
            model(**batch)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return calls


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("ring", {"batch_isend_irecv": 2}),  # 2 layers x (P-1) hops
        ("ulysses", {"all_to_all_single": 8}),  # 2 layers x (q, k, v, out)
        ("allgather", {"all_gather_single": 4}),  # 2 layers x (k, v)
    ],
)
def test_only_attention_collectives_per_forward(ranks, mode, expected):
    for calls in ranks.run(_body_collectives_per_forward, mode):
        assert calls == expected


def test_llama4_temperature_tuning_is_refused():
    """Llama-4 scales NoPE-layer queries by the token's index in the tensor: on a shard that index is wrong."""
    from models_zoo import FAMILIES

    cls, extra = FAMILIES["llama4"]
    small = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=32, intermediate_size_mlp=32, vocab_size=64)
    config = getattr(transformers, cls)(**{**extra, **small, "attn_temperature_tuning": True})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match=r"^hf_seqpar: .*attn_temperature_tuning=False"):
        hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)
