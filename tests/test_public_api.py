"""The public surface of ../shared/API.md: names, keyword arguments, defaults, an import without side effects."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import hf_seqpar

# Update this list when a public name is added (API.md allows additions, never renames).
PUBLIC_NAMES = [
    "SeqParConfig",
    "SeqParGroups",
    "SequenceParallelPlugin",
    "SequenceShardingCollator",
    "apply_memory_savings",
    "apply_sequence_parallel",
    "gather_sequence",
    "init_groups",
    "remove_memory_savings",
    "remove_sequence_parallel",
    "sequence_parallel_attention",
    "shard_sequence",
]
ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT.parent / "shared" / "API.md"
HEAVY = {"transformers", "accelerate", "peft", "trl", "datasets"}
P = inspect.Parameter


def test_all_is_sorted_and_as_checked_in():
    assert hf_seqpar.__all__ == sorted(hf_seqpar.__all__)
    assert hf_seqpar.__all__ == PUBLIC_NAMES


def test_every_public_name_resolves():
    # some names are lazy (they import transformers on first use), so this imports the integrations
    missing = []
    for name in hf_seqpar.__all__:
        try:
            getattr(hf_seqpar, name)
        except (AttributeError, ImportError) as err:
            missing.append(f"{name}: {err!r}")
    assert missing == []


# The hf_seqpar.<name> of ../shared/API.md (checked against the file itself where the checkout has it beside).
API_NAMES = {
    "SeqParConfig",
    "SequenceParallelPlugin",
    "SequenceShardingCollator",
    "apply_sequence_parallel",
    "gather_sequence",
    "init_groups",
    "sequence_parallel_attention",
    "shard_sequence",
}


def test_every_name_in_api_md_is_public():
    assert sorted(API_NAMES - set(hf_seqpar.__all__)) == []
    if API_MD.exists():
        assert set(re.findall(r"hf_seqpar\.([A-Za-z_]\w*)", API_MD.read_text())) == API_NAMES


def _params(fn) -> dict[str, tuple]:
    return {name: (p.kind, p.default) for name, p in inspect.signature(fn).parameters.items()}


def _assert_documented(fn, positional: list[str], keyword: dict[str, object]):
    """`fn` takes `positional` first, in order, and has each documented keyword-only argument with its default."""
    params = _params(fn)
    assert list(params)[: len(positional)] == positional
    for name in positional:
        assert params[name][0] is P.POSITIONAL_OR_KEYWORD, name
    for name, default in keyword.items():
        assert params.get(name) == (P.KEYWORD_ONLY, default), name


def test_sequence_parallel_attention_signature():
    _assert_documented(
        hf_seqpar.sequence_parallel_attention,
        ["q", "k", "v"],
        {
            "config": P.empty,
            "groups": P.empty,
            "causal": True,
            "scale": None,
            "cu_seqlens": None,
            "window": None,
            "softcap": None,
        },
    )


def test_shard_and_gather_signatures():
    _assert_documented(hf_seqpar.shard_sequence, ["x"], {"config": P.empty, "groups": P.empty, "dim": 1})
    _assert_documented(hf_seqpar.gather_sequence, ["local"], {"config": P.empty, "groups": P.empty, "dim": 1})


def test_init_groups_takes_the_config():
    assert list(_params(hf_seqpar.init_groups)) == ["config"]


def test_config_fields_defaults_and_keyword_only():
    fields = {f.name: f.default for f in dataclasses.fields(hf_seqpar.SeqParConfig)}
    assert fields == {
        "sp_size": 1,
        "tp_size": 1,
        "mode": "ring",
        "ulysses_size": None,
        "ring_size": None,
        "layout": "auto",
        "backend": "auto",
        "chunked_loss": False,
        "tiled_mlp": False,
        "offload_checkpoints": False,
        "recompute_norms": False,
        "recompute_lora_inputs": False,
    }
    assert {kind for kind, _ in _params(hf_seqpar.SeqParConfig).values()} == {P.KEYWORD_ONLY}
    assert all(f.metadata.get("help") for f in dataclasses.fields(hf_seqpar.SeqParConfig))  # doubles as CLI help
    assert inspect.ismethod(hf_seqpar.SeqParConfig.from_env)  # a classmethod


def test_groups_carry_the_documented_attributes():
    names = {f.name for f in dataclasses.fields(hf_seqpar.SeqParGroups)}
    assert {"sp_group", "sp_rank", "sp_size", "dp_group", "dp_rank", "dp_size"} <= names


def test_import_pulls_in_no_training_libraries():
    code = "import sys, json, hf_seqpar; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert sorted(set(json.loads(result.stdout)) & HEAVY) == []
