"""Write a tiny causal LM, its tokenizer and a JSON-lines dataset to a directory; nothing is downloaded.

    python tests/scripts/make_tiny_assets.py /tmp/tiny
    -> /tmp/tiny/model (a 2-layer Llama, 4 heads, 2 KV heads, word-level tokenizer)
       /tmp/tiny/data/{train,test}.jsonl (32 / 8 rows of {"text": ...}, 8-40 words each)

The test suite builds its assets with the same `build`, and the README's CPU example starts from it.
"""

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def build(root) -> Path:
    root = Path(root)
    words = [f"w{i}" for i in range(60)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", 32), ("test", 8)):
        lines = [json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(8, 40)))}) for _ in range(rows)]
        (root / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "tiny_assets"))
