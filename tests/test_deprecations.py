"""tests/deprecations.py blames a deprecated upstream call on hf_seqpar / recipes code, and only that.

Probe code is compiled under file names inside hf_seqpar/, recipes/, tests/ or a library folder (nothing is written
there): the check reads file names off the live stack, so that is all it sees.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import deprecations
import pytest
import transformers

LIBRARY = deprecations._LIBRARIES[0]


def _module(path: str, source: str, **names) -> dict:
    namespace = {"warnings": warnings, **names}
    exec(compile(source, path, "exec"), namespace)
    return namespace


def _call_from(where: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) called from a function whose code lives in `where`."""
    probe = _module(str(deprecations.ROOT / where), "def probe(fn, args, kwargs):\n    return fn(*args, **kwargs)\n")
    return probe["probe"](fn, args, kwargs)


@pytest.fixture
def shown():
    """Every warning shown, with the check in front: what it lets through lands in the list."""
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = deprecations.make_showwarning(lambda message, *rest: seen.append(message))
        yield seen


# Two fake libraries: `old_api` warns with stacklevel 1 (like TrainingArguments' __post_init__); `user_lib` calls it.
_OLD = _module(
    os.path.join(LIBRARY, "fake_old_lib", "api.py"),
    "def old_api():\n    warnings.warn('old_api is deprecated', FutureWarning)\n",
)
_USER = _module(
    os.path.join(LIBRARY, "fake_user_lib", "calls.py"),
    "def uses_old_api():\n    old_api()\n",
    old_api=_OLD["old_api"],
)


@pytest.mark.parametrize("where", ["hf_seqpar/_probe.py", "recipes/_probe/train.py"])
def test_our_call_to_a_deprecated_api_fails(shown, where):
    with pytest.raises(deprecations.DeprecatedCall, match=rf"{where}:2 calls deprecated upstream API.*old_api"):
        _call_from(where, _OLD["old_api"])


def test_deprecations_inside_upstream_or_from_tests_pass(shown):
    _call_from("hf_seqpar/_probe.py", _USER["uses_old_api"])  # one library's deprecated call into another
    _call_from("tests/_probe.py", _OLD["old_api"])  # tests may call what they like
    assert [str(w) for w in shown] == ["old_api is deprecated"] * 2


def test_upstream_stacklevel_pointing_at_us_fails():
    """A warning whose location (after upstream's stacklevel) is our file is ours, whatever the stack holds."""
    show = deprecations.make_showwarning(lambda *args: pytest.fail("forwarded"))
    with pytest.raises(deprecations.DeprecatedCall, match="hf_seqpar/_probe.py:7"):
        show("x is deprecated", FutureWarning, str(deprecations.ROOT / "hf_seqpar" / "_probe.py"), 7)


def test_training_arguments_old_name_is_caught(shown, tmp_path):
    """The real case: transformers 5.25 warns from its own __post_init__; TRL's config chains to it."""
    with pytest.raises(deprecations.DeprecatedCall, match=r"recipes/x/train.py:2 .*gradient_checkpointing"):
        _call_from("recipes/x/train.py", transformers.TrainingArguments, str(tmp_path), gradient_checkpointing=True)
    trl = pytest.importorskip("trl")
    with pytest.raises(deprecations.DeprecatedCall, match=r"hf_seqpar/demo/x.py:2 .*gradient_checkpointing"):
        _call_from("hf_seqpar/demo/x.py", trl.SFTConfig, str(tmp_path), gradient_checkpointing=True)
    _call_from("hf_seqpar/demo/x.py", transformers.TrainingArguments, str(tmp_path), activation_checkpointing=True)
    assert not shown


def test_logged_deprecation_is_caught():
    """transformers only logs the `past_key_values` -> `cache` rename (once per process)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import logging

    if "cache" not in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}:
        pytest.skip("this transformers has no `cache` field: `past_key_values` is not deprecated")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_warning()
    logging.warning_once.cache_clear()
    try:
        with pytest.raises(deprecations.DeprecatedCall, match=r"hf_seqpar/_probe.py:2 .*past_key_values"):
            _call_from("hf_seqpar/_probe.py", CausalLMOutputWithPast, past_key_values=None)
        _call_from("tests/_probe.py", CausalLMOutputWithPast, past_key_values=None)  # logged, not ours
    finally:
        logging.set_verbosity(verbosity)
