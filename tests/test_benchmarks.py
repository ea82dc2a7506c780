"""The benchmarks' quick modes, as `make bench` and BENCHMARKS.md use them: the efficiency table's arithmetic and
schema, and the communication volume of every mode in bf16 (K/V in bf16, dK/dV partial sums in float32) equal to
its formula exactly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _import(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return __import__(name)


def test_attention_efficiency_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = _import("attention_efficiency").main(
            [
                "--device",
                "cpu",
                "--quick",
                "--worlds",
                "2,4",
                "--modes",
                "ring,ulysses,usp",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(report))
    rows = report["results"]
    want = {(p, m, k) for p in (2, 4) for m in ("ring", "ulysses", "usp") for k in ("unpacked", "packed")}
    want -= {(2, "usp", "unpacked"), (2, "usp", "packed")}  # usp needs P >= 4
    assert {(r["world"], r["mode"], r["packing"]) for r in rows} == want
    for r in rows:
        # the reference is torch's own kernel, never hf_seqpar's (CPU: SDPA flash; packed: SDPA with a mask)
        assert r["reference"] == ("sdpa_flash_attention" if r["packing"] == "unpacked" else "sdpa_block_diagonal_mask")
        assert r["efficiency_fwd"] == pytest.approx(r["reference_fwd_s"] / (r["world"] * r["slowest_rank_fwd_s"]))
        assert r["efficiency_fwd_bwd"] == pytest.approx(
            r["reference_fwd_bwd_s"] / (r["world"] * r["slowest_rank_fwd_bwd_s"])
        )
        assert r["kernel_efficiency"] == pytest.approx(r["reference_fwd_bwd_s"] / r["monolithic_fwd_bwd_s"])
        assert r["slowest_rank_fwd_bwd_s"] > r["slowest_rank_fwd_s"] > 0
        assert (r["documents"] is None) == (r["packing"] == "unpacked")
    assert all(r["documents"] >= 256 // (2 * 64) for r in rows if r["documents"])


def _body_comm(mode):
    sys.path.insert(0, str(BENCHMARKS))
    import comm_volume

    return comm_volume.measure(mode, seq=64, heads=8, kv_heads=2, head_dim=16, dtype="bfloat16")


@pytest.mark.parametrize("mode", ["ring", "allgather", "ulysses"])
def test_comm_volume_equals_the_formula_in_bf16(ranks, mode):
    for row in ranks.run(_body_comm, mode):
        assert row["fwd_bytes"] == row["fwd_formula"] and row["bwd_bytes"] == row["bwd_formula"], row


def test_backend_table_plan_through_the_cuda_standin(tmp_path):
    # no GPU: every backend's hops run through the stand-in and the rows name only the exact backends available;
    # rewriting the table keeps the file importable and the measured rows in it
    module = _import("backend_table")
    report = module.main(["--device", "cpu", "--out", str(tmp_path / "t.json")])
    rows = report["rows"]
    assert {(r["dtype"], r["mask"]) for r in rows} == {("half", m) for m in ("dense", "window", "packed")}
    assert all(set(r["order"]) == {"torch", "cudnn"} for r in rows)  # the stand-in plays cuDNN, not flash-attn
    table = tmp_path / "auto_table.py"
    table.write_text((module.TABLE).read_text())
    module.write_table([{**r, "device": "cuda"} for r in rows], table, "test")
    namespace: dict = {}
    exec(table.read_text(), namespace)
    assert namespace["AUTO"][("cuda", "half", "dense")] == tuple(rows[0]["order"])


def test_train_step_plumbing_on_cpu(tmp_path):
    # the tiny CPU mode: both arms train the same model on the same row, so their first losses agree (the hf_seqpar
    # arm's attention and collator at sp_size=1 are exact); the times and MFU are only recorded, not judged
    threads = torch.get_num_threads()
    try:
        report = _import("train_step").main(["--device", "cpu", "--steps", "1", "--out", str(tmp_path / "s.json")])
    finally:
        torch.set_num_threads(threads)
    plain, ours = report["results"]
    assert (plain["arm"], ours["arm"]) == ("transformers_sdpa", "hf_seqpar_sp1")
    assert plain["model_flops"] == ours["model_flops"] > 0 and ours["tokens_per_s"] > 0
    assert ours["loss"] == pytest.approx(plain["loss"], rel=1e-5)  # float32, after 2 identical optimizer steps
