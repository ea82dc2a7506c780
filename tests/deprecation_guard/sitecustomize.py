"""Test-only: tests/deprecations.py's check in every subprocess the tests start (tests/conftest.py puts this folder
on PYTHONPATH). Loaded by path, so tests/ itself stays off the subprocesses' sys.path."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_deprecations", Path(__file__).parents[1] / "deprecations.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.install_in_subprocess()
