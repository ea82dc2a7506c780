"""Shared fixtures.

``ranks``: a live gloo RankPool (see _ranks.py) with 2 ranks; for 4 ranks parametrize the test with
``@pytest.mark.parametrize("ranks", [4], indirect=True)``.  Bodies run via ``ranks.run(_body_x, ...)``.
"""

import sys
from pathlib import Path

import pytest

# Spawned workers unpickle test bodies by module name (e.g. ``test_rank_pool._body_sum``), so tests/ must be
# on sys.path, which spawn copies to the children.  pytest's default "prepend" import mode already puts it
# there (tests/ has no __init__.py); this keeps other import modes working too.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import os  # noqa: E402
import warnings  # noqa: E402

import deprecations  # noqa: E402
from _ranks import close_shared_pools, shared_pool  # noqa: E402

# Deprecated upstream API called from hf_seqpar/, recipes/ or the demo fails the test (tests/deprecations.py): here
# per test, and in every subprocess started from here (rank workers, launched scripts) through sitecustomize.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [deprecations.GUARD_DIR, os.environ.get("PYTHONPATH")]))
deprecations.install_log_check()


@pytest.fixture(autouse=True)
def _no_deprecated_calls():
    previous = warnings.showwarning  # pytest's recorder, set up for this test
    warnings.showwarning = deprecations.make_showwarning(previous)
    yield
    warnings.showwarning = previous


@pytest.fixture(scope="session")
def _rank_pools():
    yield
    close_shared_pools()


@pytest.fixture
def one_thread():
    """Hundreds of tiny kernels: with several threads on a busy 2-core machine they crawl (measured 15x)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ranks(request, _rank_pools):
    return shared_pool(getattr(request, "param", 2))
