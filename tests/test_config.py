"""SeqParConfig validation, `resolve`, env round trip, and the errors raised at init_groups / attention time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_seqpar
from hf_seqpar import SeqParConfig


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        ({"mode": "bogus"}, ["mode='bogus'"]),
        ({"layout": "spiral"}, ["layout='spiral'"]),
        ({"backend": "cudnn9"}, ["backend='cudnn9'"]),
        ({"sp_size": 0}, ["sp_size=0"]),
        ({"sp_size": 4, "mode": "usp"}, ["sp_size=4"]),
        (
            {"sp_size": 4, "mode": "usp", "ulysses_size": 3, "ring_size": 2},
            ["ulysses_size=3", "ring_size=2", "sp_size=4"],
        ),
        ({"sp_size": 4, "mode": "usp", "ulysses_size": 3}, ["ulysses_size=3", "sp_size=4"]),
        ({"sp_size": 4, "mode": "ring", "ulysses_size": 2}, ["ulysses_size=2", "sp_size=4", "mode='usp'"]),
        ({"sp_size": 4, "mode": "ulysses", "ring_size": 2}, ["ring_size=2", "sp_size=4"]),
    ],
)
def test_invalid_settings_name_the_numbers(kwargs, needles):
    with pytest.raises(ValueError) as err:
        SeqParConfig(**kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_ulysses_refuses_heads_it_cannot_split_and_says_what_to_use():
    with pytest.raises(ValueError) as err:
        SeqParConfig(sp_size=4, mode="ulysses").resolve(6, 6)
    for needle in ["sp_size=4", "num_attention_heads=6", "mode='ring'"]:
        assert needle in str(err.value)


def test_resolve_refuses_query_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_attention_heads=6 must be a multiple of num_key_value_heads=4"):
        SeqParConfig(sp_size=2, mode="ring").resolve(6, 4)


@pytest.mark.parametrize(
    "sp_size,heads,mode,split",
    [
        (4, (8, 2), "ulysses", (4, 1)),
        (4, (6, 2), "usp", (2, 2)),
        (4, (6, 3), "usp", (2, 2)),
        (8, (12, 4), "usp", (4, 2)),
        (6, (4, 4), "usp", (2, 3)),
        (4, (5, 5), "ring", (1, 4)),
        (4, (5, 1), "ring", (1, 4)),
    ],
)
def test_auto_picks_the_largest_ulysses_degree_dividing_the_heads(sp_size, heads, mode, split):
    cfg = SeqParConfig(sp_size=sp_size, mode="auto").resolve(*heads)
    assert (cfg.mode, cfg.split, cfg.layout, cfg.resolved_layout) == (mode, split, "zigzag", "zigzag")
    assert cfg.sp_size == sp_size


def test_auto_keeps_an_explicit_layout():
    assert SeqParConfig(sp_size=4, mode="auto", layout="contiguous").resolve(8, 8).layout == "contiguous"


@pytest.mark.parametrize(
    "kwargs,layout",
    [
        ({"sp_size": 4, "mode": "ring"}, "zigzag"),
        ({"sp_size": 4, "mode": "allgather"}, "zigzag"),
        ({"sp_size": 4, "mode": "usp", "ulysses_size": 2}, "zigzag"),
        ({"sp_size": 4, "mode": "auto"}, "zigzag"),
        ({"sp_size": 4, "mode": "ulysses"}, "contiguous"),
        ({"sp_size": 1, "mode": "ring"}, "contiguous"),
        ({"sp_size": 4, "mode": "ring", "layout": "contiguous"}, "contiguous"),
        ({"sp_size": 4, "mode": "ulysses", "layout": "zigzag"}, "zigzag"),
    ],
)
def test_resolved_layout(kwargs, layout):
    assert SeqParConfig(**kwargs).resolved_layout == layout


def test_env_round_trip_and_exact_variables(monkeypatch):
    cfg = SeqParConfig(sp_size=4, mode="usp", ulysses_size=2, layout="contiguous", backend="torch")
    env = cfg.to_env()
    assert env == {
        "HF_SEQPAR_SP_SIZE": "4",
        "HF_SEQPAR_MODE": "usp",
        "HF_SEQPAR_ULYSSES_SIZE": "2",
        "HF_SEQPAR_LAYOUT": "contiguous",
        "HF_SEQPAR_BACKEND": "torch",
    }
    assert SeqParConfig.from_env(env) == cfg
    assert SeqParConfig.from_env({}) == SeqParConfig()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert SeqParConfig.from_env() == cfg


def test_from_env_names_the_bad_variable():
    with pytest.raises(ValueError, match="HF_SEQPAR_SP_SIZE='x'"):
        SeqParConfig.from_env({"HF_SEQPAR_SP_SIZE": "x"})


def test_frozen_and_keyword_only():
    cfg = SeqParConfig(sp_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sp_size = 4
    with pytest.raises(TypeError):
        SeqParConfig(2)


# ---- errors raised on ranks (bodies catch them and return the message, so the pool stays alive) ----

_GROUPS: dict = {}


def _groups(cfg):
    if cfg not in _GROUPS:
        _GROUPS[cfg] = hf_seqpar.init_groups(cfg)
    return _GROUPS[cfg]


def _body_init_groups_error(sp_size):
    try:
        hf_seqpar.init_groups(SeqParConfig(sp_size=sp_size))
    except ValueError as err:
        return str(err)
    return None


def _body_attention_error(mode, q_shape, k_shape, cu_seqlens=None):
    cfg = SeqParConfig(sp_size=2, mode=mode)
    groups = _groups(cfg)
    q, k = torch.zeros(q_shape, dtype=torch.float64), torch.zeros(k_shape, dtype=torch.float64)
    try:
        hf_seqpar.sequence_parallel_attention(q, k, k, config=cfg, groups=groups, cu_seqlens=cu_seqlens)
    except ValueError as err:
        return str(err)
    return None


def test_init_groups_refuses_sp_size_not_dividing_world(ranks):
    for message in ranks.run(_body_init_groups_error, 3):
        assert message is not None and "sp_size=3" in message and "world_size=2" in message


@pytest.mark.parametrize(
    "mode,q_shape,k_shape,cu_seqlens,needles",
    [
        ("ulysses", (1, 4, 3, 8), (1, 4, 3, 8), None, ["sp_size=2", "num_attention_heads=3"]),
        ("ring", (1, 3, 2, 8), (1, 3, 2, 8), None, ["6", "multiple of 4"]),  # local 3 x 2 ranks; zigzag needs 2P
        ("allgather", (1, 3, 2, 8), (1, 3, 2, 8), None, ["multiple of 4"]),
        ("ring", (1, 4, 2, 8), (1, 4, 2, 8), [0, 3, 6], ["8"]),  # full length is 8, offsets end at 6
        ("ring", (1, 4, 2, 8), (1, 6, 2, 8), None, ["(1, 4, 2, 8)", "(1, 6, 2, 8)"]),
        ("ring", (1, 4, 2, 8), (1, 4, 2, 4), None, ["(1, 4, 2, 8)", "(1, 4, 2, 4)"]),
        ("ring", (1, 4, 3, 8), (1, 4, 2, 8), None, ["heads_q=3", "heads_kv=2"]),
    ],
    ids=[
        "ulysses-heads",
        "ring-odd-zigzag",
        "allgather-odd-zigzag",
        "cu_seqlens-end",
        "seq-mismatch",
        "head_dim-mismatch",
        "gqa-ratio",
    ],
)
def test_attention_input_errors(ranks, mode, q_shape, k_shape, cu_seqlens, needles):
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    for message in ranks.run(_body_attention_error, mode, q_shape, k_shape, cu):
        assert message is not None, "no ValueError raised"
        for needle in needles:
            assert needle in message, message
