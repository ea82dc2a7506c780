"""`make demo`: a long-context LoRA fine-tune with sequence parallelism on 2 CPU processes (see `__main__.py`).

`tiny` and `passkey` build the tokenizer, the tiny models and the data in code; the recipes' `--tiny` mode uses them
too. Nothing here is imported by `hf_seqpar` itself.
"""
