"""Tiny stand-ins built in code, nothing downloaded: a word-level tokenizer and tiny causal LMs of the families the
recipes fine-tune (`make demo` and every recipe's `--tiny` use them).

The tokenizer knows the digits and the few words of `passkey.py`'s texts; each is one token, so a text of N words is
N tokens long (plus `<s>`), which makes the token arithmetic of the demo exact.
"""

from __future__ import annotations

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
DIGITS = tuple(str(d) for d in range(10))
# The classic passkey filler ("The grass is green. The sky is blue. ...") and the words of the needle and question.
FILLER_SENTENCES = (
    "the grass is green .",
    "the sky is blue .",
    "the sun is yellow .",
    "here we go .",
    "there and back again .",
)
TASK_WORDS = ("pass", "key", "remember", "it", "what", "?")
WORDS = tuple(sorted({w for s in FILLER_SENTENCES for w in s.split()} | set(TASK_WORDS)))
VOCAB = (*SPECIAL_TOKENS, *DIGITS, *WORDS)

# Shapes of the tiny models (hidden 64, 4 query heads of 16, 2 KV heads: GQA like the real ones, 2 layers: the fewest
# that can learn to look a key up, https://transformer-circuits.pub/2021/framework "induction heads").
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    attention_dropout=0.0,
    tie_word_embeddings=False,
)


def word_tokenizer(model_max_length: int = 1 << 20):
    """A `PreTrainedTokenizerFast` over `VOCAB`: whitespace-separated words, one id each; `<s>` is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def _ids() -> dict:
    return dict(pad_token_id=VOCAB.index("<pad>"), bos_token_id=VOCAB.index("<s>"), eos_token_id=VOCAB.index("</s>"))


def tiny_config(family: str = "llama", **overrides):
    """A tiny config of `family` ("llama", "qwen2", "mistral") with `TINY_SHAPE`, our vocabulary and `overrides`."""
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
    if family not in classes:
        raise ValueError(f"hf_seqpar: no tiny config for family {family!r}; known: {sorted(classes)}")
    config_class = getattr(transformers, classes[family])
    return config_class(vocab_size=len(VOCAB), **TINY_SHAPE, **_ids(), **overrides)


def tiny_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A freshly initialised causal LM for `config`, the same on every process that passes the same seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
