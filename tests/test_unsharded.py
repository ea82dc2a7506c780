"""After switching, forwards of batches that did not come from SequenceShardingCollator (generate, a prompt checked
on one rank) compute exactly what the unswitched model computes; `remove_sequence_parallel` switches back.
Unknown attention arguments are refused, not ignored."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from models_zoo import VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.integrations.transformers import STATE_ATTR

SINGLE = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
CFG1 = hf_seqpar.SeqParConfig(sp_size=1, mode="ring")


def _padded_prompts():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0  # left padding, as generate expects
    return ids, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_unsharded_forward_and_backward_equal_the_plain_model(impl):
    """Same attention function and same masks as before the switch: equal to the bit, gradient checkpointing
    included (its recompute runs outside the forward hooks and falls back inside our attention function)."""
    ids, mask = _padded_prompts()
    plain, model = tiny_model("mistral", attn_implementation=impl), tiny_model("mistral", attn_implementation=impl)
    for m in (plain, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)
    labels = ids.masked_fill(mask == 0, -100)
    ref = plain(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    out.loss.backward()
    assert torch.equal(out.logits, ref.logits)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert model.config._attn_implementation == "hf_seqpar_ring"  # switched back after the forward


def test_generate_after_switching_returns_the_plain_tokens():
    ids, mask = _padded_prompts()
    plain = tiny_model("qwen2", attn_implementation="sdpa").eval()
    model = hf_seqpar.apply_sequence_parallel(
        tiny_model("qwen2", attn_implementation="sdpa").eval(), config=CFG1, groups=SINGLE
    )
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def _body_generate_during_training(mode):
    """A sharded training step, then a greedy sample on rank 0 only (no collectives may run), then another step."""
    cfg = hf_seqpar.SeqParConfig(sp_size=2, mode=mode)
    groups = hf_seqpar.init_groups(cfg)
    plain = tiny_model("llama").eval()
    model = hf_seqpar.apply_sequence_parallel(tiny_model("llama"), config=cfg, groups=groups)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    batch = hf_seqpar.SequenceShardingCollator(lambda f: {"input_ids": ids}, config=cfg, groups=groups)([])
    model(**batch, num_items_in_batch=torch.tensor(23)).loss.backward()
    same = None
    if dist.get_rank() == 0:
        model.eval()
        prompt = ids[:, :7]
        sample = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        same = torch.equal(sample, plain.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0))
        model.train()
    model(**batch, num_items_in_batch=torch.tensor(23)).loss.backward()  # still sharded afterwards
    return same


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_generate_on_one_rank_during_sp_training(ranks, mode):
    assert ranks.run(_body_generate_during_training, mode)[0] is True


def test_remove_sequence_parallel_restores_the_model():
    plain = tiny_model("llama", attn_implementation="sdpa")
    model = tiny_model("llama", attn_implementation="sdpa")
    hooks_before = len(model._forward_pre_hooks), len(model._forward_hooks)
    hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)
    assert hf_seqpar.remove_sequence_parallel(model) is model
    assert model.config._attn_implementation == "sdpa"
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks_before
    assert not any(STATE_ATTR in m.__dict__ for m in model.modules())
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    hf_seqpar.remove_sequence_parallel(model)  # a model that is not switched: unchanged


def test_apply_twice_replaces_the_first_switch():
    model = tiny_model("llama", attn_implementation="sdpa")
    hf_seqpar.apply_sequence_parallel(model, config=CFG1, groups=SINGLE)
    hf_seqpar.apply_sequence_parallel(model, config=hf_seqpar.SeqParConfig(sp_size=1, mode="ulysses"), groups=SINGLE)
    assert model.config._attn_implementation == "hf_seqpar_ulysses"
    hf_seqpar.remove_sequence_parallel(model)
    assert model.config._attn_implementation == "sdpa"  # the original, not the first switch


def test_unknown_attention_kwargs_are_refused():
    model = hf_seqpar.apply_sequence_parallel(tiny_model("llama"), config=CFG1, groups=SINGLE)
    ids = torch.randint(3, VOCAB, (1, 16))
    batch = hf_seqpar.SequenceShardingCollator(lambda f: {"input_ids": ids}, config=CFG1, groups=SINGLE)([])
    with pytest.raises(NotImplementedError, match=r"^hf_seqpar: .*\['attention_temperature'\].*does not know"):
        model(**batch, attention_temperature=0.5)
    with pytest.raises(NotImplementedError, match=r"^hf_seqpar: .*output_attentions=True"):
        model(**batch, output_attentions=True)
