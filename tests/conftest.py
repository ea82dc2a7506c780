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

from _ranks import close_shared_pools, shared_pool  # noqa: E402


@pytest.fixture(scope="session")
def _rank_pools():
    yield
    close_shared_pools()


@pytest.fixture
def ranks(request, _rank_pools):
    return shared_pool(getattr(request, "param", 2))
