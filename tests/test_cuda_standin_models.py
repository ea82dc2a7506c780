"""Whole models through the CUDA path on CPU: the parity bodies of test_models.py (float32, plain reference) and
test_precision.py (bf16 autocast, reference under the same setting) run in gloo ranks with the CUDA stand-in on
(hf_seqpar/kernels/standin.py). float32 then takes the per-tile SDPA efficient-attention path that crashed on the
GPU with packed rows and windows; bf16 takes torch's FA2 varlen rounds, the path that was silently wrong for a ring
with documents and a window. Families: Llama, Mistral (window), Gemma-2 (softcap + window), GPT-OSS (sinks),
DeepSeek-V3 (MLA head dims), Llama-4 (chunked attention).
"""

from __future__ import annotations

import pytest
import test_models
import test_precision

from hf_seqpar.kernels import standin


def _under_standin(body, *args):
    with standin.cuda_standin():
        return body(*args)


FP32_CASES = [  # (family, mode, rows, ulysses)
    ("llama", "ring", "packed", None),
    ("mistral", "ring", "packed", None),
    ("gemma2", "ulysses", "padded", None),
    ("gpt_oss", "allgather", "packed", None),
    ("deepseek_v3", "ring", "packed", None),
    ("llama4", "ulysses", "packed", None),
]


@pytest.mark.parametrize("family,mode,rows,ulysses", FP32_CASES)
def test_float32_models_through_the_cuda_path(ranks, family, mode, rows, ulysses):
    test_models._check(ranks.run(_under_standin, test_models._body_model_parity, family, mode, rows, ulysses))


BF16 = test_precision.BF16
BF16_CASES = [  # (family, mode, weights, autocast, lora, checkpointing): Trainer(bf16=True) and TRL's defaults
    ("llama", "ring", test_precision.FP32, BF16, False, None),
    ("mistral", "ring", test_precision.FP32, BF16, True, "non-reentrant"),
    ("gpt_oss", "ulysses", test_precision.FP32, BF16, False, None),
    ("gemma2", "allgather", BF16, None, False, None),
]


@pytest.mark.parametrize("family,mode,weights,autocast,lora,checkpointing", BF16_CASES)
def test_bf16_models_through_the_cuda_path(ranks, family, mode, weights, autocast, lora, checkpointing):
    body = test_precision._body_precision
    test_precision._check(ranks.run(_under_standin, body, family, mode, weights, autocast, lora, checkpointing))


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize("mode", ["ring", "usp"])
def test_four_ranks_through_the_cuda_path(ranks, mode):
    test_models._check(
        ranks.run(
            _under_standin, test_models._body_model_parity, "mistral", mode, "packed", 2 if mode == "usp" else None
        )
    )
