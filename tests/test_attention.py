"""Distributed attention equals plain full attention, forward and backward, for every mode, mask and head layout.

Every rank builds the same full inputs from one seed, computes the plain reference (tests/reference.py), shards
with `shard_sequence`, runs `sequence_parallel_attention`, gathers outputs and gradients back, and reports the
largest difference. float64 must agree within 1e-10 (measured ~1e-15); float32 within float32 rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import attention

import hf_seqpar

SEQ, BATCH, HEAD_DIM = 32, 2, 8
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}
DOCS_1D = [0, 5, 13, 14, 27, 32]  # documents cross shard boundaries; one is a single token
DOCS_ROWS = [[0, 5, 13, 14, 27, 32], [0, 16, 17, 32]]
FEATURES = {
    "plain": {},
    "packed": {"cu_seqlens": DOCS_1D},
    "window": {"window": 6},
    "softcap": {"softcap": 2.0},
    "sinks": {"sinks": True},
    "all": {"cu_seqlens": DOCS_ROWS, "window": 5, "softcap": 3.0, "sinks": True},
}
_GROUPS: dict = {}  # per worker: process groups are built once per config


def _groups(cfg):
    key = (cfg.sp_size, cfg.mode, cfg.ulysses_size)
    if key not in _GROUPS:
        _GROUPS[key] = hf_seqpar.init_groups(cfg)
    return _GROUPS[key]


def _inputs(heads, dtype, seed, with_sinks):
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q = torch.randn(BATCH, SEQ, hq, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(BATCH, SEQ, hkv, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, SEQ, hkv, HEAD_DIM, generator=gen, dtype=torch.float64)
    dout = torch.randn(BATCH, SEQ, hq, HEAD_DIM, generator=gen, dtype=torch.float64)
    sinks = torch.randn(hq, generator=gen, dtype=torch.float64) if with_sinks else None
    cast = [t.to(dtype) if t is not None else None for t in (q, k, v, dout, sinks)]
    return cast


def _body_parity(cfg_kwargs, heads, feature, causal, dtype, seed=0):
    import torch.distributed as dist

    cfg = hf_seqpar.SeqParConfig(sp_size=dist.get_world_size(), **cfg_kwargs)
    groups = _groups(cfg)
    opts = dict(FEATURES[feature])
    q, k, v, dout, sinks = _inputs(heads, dtype, seed, opts.pop("sinks", False))
    docs = opts.pop("cu_seqlens", None)
    rows = None if docs is None else ([docs] if isinstance(docs[0], int) else docs)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + (
        [sinks.clone().requires_grad_()] if sinks is not None else []
    )
    ref = attention(
        *leaves[:3], causal=causal, cu_seqlens_rows=rows, sinks=leaves[3] if sinks is not None else None, **opts
    )
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    def shard(x):
        return hf_seqpar.shard_sequence(x, config=cfg, groups=groups, dim=1)

    local = [shard(t).requires_grad_() for t in (q, k, v)]
    local_sinks = sinks.clone().requires_grad_() if sinks is not None else None
    cu = (
        None
        if docs is None
        else (torch.tensor(docs, dtype=torch.int32) if rows == [docs] else [torch.tensor(r) for r in rows])
    )
    out = hf_seqpar.sequence_parallel_attention(
        *local, config=cfg, groups=groups, causal=causal, cu_seqlens=cu, sinks=local_sinks, **opts
    )
    grads = torch.autograd.grad(out, local + ([local_sinks] if sinks is not None else []), shard(dout))

    def full(x):
        return hf_seqpar.gather_sequence(x.detach(), config=cfg, groups=groups, dim=1)

    errors = {"out": (full(out) - ref).abs().max().item()}
    for name, got, want in zip("qkv", grads[:3], ref_grads[:3], strict=True):
        errors["d" + name] = (full(got) - want).abs().max().item()
    if sinks is not None:  # each rank holds its rows' share of d(sinks): the SP group sums them (as DDP does)
        d_sinks = grads[3].clone()
        dist.all_reduce(d_sinks, group=groups.sp_group)
        errors["dsinks"] = (d_sinks - ref_grads[3]).abs().max().item()
    return errors


def _cases(world, modes):
    for mode, heads, feature, causal in itertools.product(modes, HEADS, FEATURES, (True, False)):
        kwargs = {"mode": mode} if mode != "usp" else {"mode": "usp", "ulysses_size": 2}
        yield pytest.param(
            kwargs, heads, feature, causal, id=f"{mode}-{heads}-{feature}-{'causal' if causal else 'full'}"
        )


def _assert_close(errors_per_rank, tol):
    for rank, errors in enumerate(errors_per_rank):
        bad = {k: v for k, v in errors.items() if not v <= tol}
        assert not bad, f"rank {rank}: errors above {tol}: {bad}"


@pytest.mark.parametrize("cfg_kwargs,heads,feature,causal", list(_cases(2, ["ring", "allgather", "ulysses", "auto"])))
def test_float64_parity_2_ranks(ranks, cfg_kwargs, heads, feature, causal):
    _assert_close(ranks.run(_body_parity, cfg_kwargs, HEADS[heads], feature, causal, torch.float64), 1e-10)


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize(
    "cfg_kwargs,heads,feature,causal", list(_cases(4, ["ring", "allgather", "ulysses", "usp", "auto"]))
)
def test_float64_parity_4_ranks(ranks, cfg_kwargs, heads, feature, causal):
    _assert_close(ranks.run(_body_parity, cfg_kwargs, HEADS[heads], feature, causal, torch.float64), 1e-10)


@pytest.mark.parametrize("ranks", [4], indirect=True)
@pytest.mark.parametrize(
    "cfg_kwargs",
    [
        {"mode": "ring", "layout": "contiguous"},
        {"mode": "allgather", "layout": "contiguous"},
        {"mode": "ulysses", "layout": "zigzag"},
        {"mode": "usp", "ulysses_size": 2, "layout": "contiguous"},
        {"mode": "usp", "ring_size": 4},
        {"mode": "usp", "ulysses_size": 4},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
@pytest.mark.parametrize("feature", ["plain", "all"])
def test_other_layouts_and_splits(ranks, cfg_kwargs, feature):
    _assert_close(ranks.run(_body_parity, cfg_kwargs, HEADS["gqa"], feature, True, torch.float64), 1e-10)


@pytest.mark.parametrize("ranks", [4], indirect=True)
def test_ulysses_expands_kv_heads_that_do_not_split(ranks):
    # 12 query heads, 6 key heads over 4 ranks: neither 6 % 4 nor 4 % 6 is 0, so keys are expanded per query head
    _assert_close(ranks.run(_body_parity, {"mode": "ulysses"}, (12, 6), "packed", True, torch.float64), 1e-10)


@pytest.mark.parametrize("mode", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize("feature", ["plain", "all"])
def test_float32_parity(ranks, mode, feature):
    # float32 inputs, float32 accumulation: errors of a few float32 ulps of values of order 1
    _assert_close(ranks.run(_body_parity, {"mode": mode}, HEADS["gqa"], feature, True, torch.float32), 2e-5)
