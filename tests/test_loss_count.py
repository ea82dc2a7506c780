"""Whether a model's loss takes the global count `num_items_in_batch` is decided from what its forward does.

Under sequence parallelism each rank's loss must be `local_sum / N` with N the count of the whole batch
(DESIGN.md, "Loss and gradients"); a loss that averages the rank's own shard gives every rank another denominator.
hf_seqpar watches the model's `loss_function` during the first sharded forward given labels and the count, and
refuses, from that forward (before any gradient), a model whose loss never received the count. Single-process
(sp_size=1: the collator's batch is sharded, one shard), so each test is a few tiny forwards.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from models_zoo import VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.integrations.transformers import STATE_ATTR

SINGLE = hf_seqpar.SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
CFG1 = hf_seqpar.SeqParConfig(sp_size=1, mode="ring")
IGNORES = r"^hf_seqpar: {}\.forward computes its own mean loss and never sees num_items_in_batch"


class OwnMeanLlama(transformers.LlamaForCausalLM):
    """A causal LM whose forward averages the cross-entropy of the tokens it was given (its shard, under SP)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        return out


class DroppedCountLlama(transformers.LlamaForCausalLM):
    """Takes the count by name, then leaves it out of the loss: a source search for the word passes it."""

    def forward(self, *args, num_items_in_batch=None, **kwargs):
        return super().forward(*args, **kwargs)


def _model(cls=transformers.LlamaForCausalLM, config=CFG1, lora=False):
    plain = tiny_model("llama")
    model = cls(plain.config).float().train()
    model.load_state_dict(plain.state_dict())  # the weights of tiny_model("llama"), the reference
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True))
    return hf_seqpar.apply_sequence_parallel(model, config=config, groups=SINGLE)


def _batch():
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = hf_seqpar.SequenceShardingCollator(
        lambda f: {"input_ids": ids, "labels": ids}, config=CFG1, groups=SINGLE
    )([])
    return ids, batch, (batch["shift_labels"] != -100).sum()


@pytest.mark.parametrize("cls", [OwnMeanLlama, DroppedCountLlama])
def test_a_loss_that_never_gets_the_count_is_refused_at_the_first_sharded_forward(cls):
    model = _model(cls)  # applying passes: what the forward does is not known yet
    _, batch, n = _batch()
    with pytest.raises(NotImplementedError, match=IGNORES.format(cls.__name__)):
        model(**batch, num_items_in_batch=n)  # raised by the forward itself: no loss to step with
    assert "_loss_function" not in vars(model)  # the watch is taken off again
    assert model.config._attn_implementation == "hf_seqpar_ring"  # and the forward's own switches are undone
    with pytest.raises(NotImplementedError, match=IGNORES.format(cls.__name__)):
        model(**batch, num_items_in_batch=n)  # every such forward, not only the first


def test_the_word_alone_passed_the_old_source_search():
    assert "num_items_in_batch" in inspect.getsource(DroppedCountLlama.forward)


@pytest.mark.parametrize("lora", [False, True])
def test_a_loss_that_takes_the_count_is_unchanged(lora):
    ids, batch, n = _batch()
    plain = tiny_model("llama")(input_ids=ids, labels=ids).loss
    model = _model(lora=lora)
    base = model.get_base_model() if lora else model
    first = model(**batch, num_items_in_batch=n).loss  # watched
    assert getattr(base, STATE_ATTR).loss_count.passed and "_loss_function" not in vars(base)
    second = model(**batch, num_items_in_batch=n).loss  # not watched any more
    assert torch.equal(first, second)  # the watch only counts calls
    # float32 model, same math in a different kernel order
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-6)


def test_a_forward_without_labels_or_count_is_not_judged():
    model = _model(OwnMeanLlama)
    _, batch, n = _batch()
    model(**batch)  # no count: not what the check is about (trainer.py and accelerator.py supply the count)
    model.eval()
    with pytest.raises(NotImplementedError, match=IGNORES.format("OwnMeanLlama")):
        model(**batch, num_items_in_batch=n)  # eval with the count: the same wrong denominator
    assert not getattr(model, STATE_ATTR).loss_count.passed


def test_a_forward_defined_without_source_is_judged_by_what_it_does():
    namespace: dict = {}
    exec(  # inspect cannot read this forward: a source search had to refuse it
        "def forward(self, input_ids=None, labels=None, **kwargs):\n"
        "    return super(type(self), self).forward(input_ids=input_ids, labels=labels, **kwargs)",
        namespace,
    )
    dynamic = type("DynamicLlamaForCausalLM", (transformers.LlamaForCausalLM,), {"forward": namespace["forward"]})
    with pytest.raises(OSError):
        inspect.getsource(dynamic.forward)
    _, batch, n = _batch()
    _model(dynamic)(**batch, num_items_in_batch=n).loss.backward()


def test_hf_seqpar_s_own_chunked_loss_is_not_refused():
    """chunked_loss computes the loss itself (sum / num_items_in_batch), without the model's loss_function."""
    model = _model(config=hf_seqpar.SeqParConfig(sp_size=1, mode="ring", chunked_loss=True))
    ids, batch, n = _batch()
    out = model(**batch, num_items_in_batch=n)
    assert out.logits is None  # the chunked path ran
    torch.testing.assert_close(out.loss, tiny_model("llama")(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
