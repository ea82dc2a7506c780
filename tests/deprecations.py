"""Deprecated upstream API called from hf_seqpar's own code, the recipes or the demo fails the tests.

Upstream announces a deprecation with a FutureWarning / DeprecationWarning or, in transformers, a logged warning
("... is deprecated ..."). Neither reliably names the caller: `TrainingArguments(gradient_checkpointing=True)` warns
from transformers' own `__post_init__` (stacklevel 1) and the `past_key_values` rename only logs. So the check looks
at the live stack while the notice is raised: it walks out of the library that raised it (and out of constructors
in between, e.g. TRL's `SFTConfig.__post_init__` chaining to transformers') to the code that made the call. If that
code is under hf_seqpar/ or recipes/, the notice is raised as an error there; anything else (a library calling
another's deprecated API, tests) passes through untouched.

Installed by tests/conftest.py in the pytest process (per test: pytest swaps the warning display for each test) and,
through PYTHONPATH=tests/deprecation_guard (its sitecustomize.py), in every subprocess the tests start: rank
workers, launched training scripts, the demo.
"""

from __future__ import annotations

import logging
import os
import re
import site
import sys
import sysconfig
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(str(ROOT / d) + os.sep for d in ("hf_seqpar", "recipes"))
GUARD_DIR = str(Path(__file__).resolve().parent / "deprecation_guard")
CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
_LIBRARIES = tuple(
    p + os.sep for p in {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"]}
)
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep
_PLUMBING = (warnings.__file__, logging.__file__, __file__)  # frames between the notice and where it was raised
_CONSTRUCTORS = ("__init__", "__post_init__")
_DEPRECATED = re.compile(r"deprecat", re.IGNORECASE)


class DeprecatedCall(FutureWarning):
    """Raised where our code calls an API its library has deprecated (a warning class, so `-W error` habits apply)."""


def _owner(filename: str) -> str | None:
    """`ours`, `<generated>` (dataclass / exec'd code), the library a file belongs to, or None for other code."""
    if filename.startswith("<"):
        return "<generated>"
    if filename.startswith(OURS):
        return "ours"
    for prefix in _LIBRARIES:
        if filename.startswith(prefix):
            return filename[len(prefix) :].split(os.sep, 1)[0]
    return "stdlib" if filename.startswith(_STDLIB) else None


def blame(frame) -> str | None:
    """`file:line` of our code that made the deprecated call whose notice is being raised in `frame`'s callees,
    or None when the call is not ours. `frame` is any frame at or below the notice (plumbing frames are skipped)."""
    while frame is not None and frame.f_code.co_filename in _PLUMBING:
        frame = frame.f_back
    if frame is None:
        return None
    library = _owner(frame.f_code.co_filename)
    if library is None:  # raised by other code (tests, scripts): not about an upstream API
        return None
    while frame is not None:
        owner = _owner(frame.f_code.co_filename)
        if owner == "ours":
            break
        constructor = owner is not None and frame.f_code.co_name in _CONSTRUCTORS  # subclass chaining to a base
        if owner not in (library, "<generated>") and not constructor:
            break
        frame = frame.f_back
    if frame is None or _owner(frame.f_code.co_filename) != "ours":
        return None
    return f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno}"


def _here():
    return sys._getframe(1)


def make_showwarning(forward, drop_deprecation_warnings: bool = False):
    """A `warnings.showwarning` that raises DeprecatedCall for our deprecated calls and hands the rest to `forward`."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CATEGORIES):
            where = blame(_here())
            if where is None and filename.startswith(OURS):  # upstream's stacklevel already points at us
                where = f"{os.path.relpath(filename, ROOT)}:{lineno}"
            if where is not None:
                raise DeprecatedCall(f"{where} calls deprecated upstream API: {category.__name__}: {message}")
            if drop_deprecation_warnings and issubclass(category, DeprecationWarning):
                return  # shown only so the check sees them; Python's default filters hide them
        forward(message, category, filename, lineno, file, line)

    return showwarning


class _DeprecationLogHandler(logging.Handler):
    """The same check for deprecations that transformers only logs."""

    def emit(self, record: logging.LogRecord) -> None:
        if _DEPRECATED.search(record.getMessage()) and (where := blame(_here())) is not None:
            raise DeprecatedCall(f"{where} calls deprecated upstream API: {record.name}: {record.getMessage()}")


def install_log_check() -> None:
    """Once per process: watch transformers' loggers (without importing transformers)."""
    root = logging.getLogger("transformers")
    if not any(isinstance(h, _DeprecationLogHandler) for h in root.handlers):
        root.addHandler(_DeprecationLogHandler(logging.WARNING))


def install_in_subprocess() -> None:
    """For sitecustomize: DeprecationWarnings must reach the display to be checked; the others are dropped again."""
    warnings.filterwarnings("default", category=DeprecationWarning)
    warnings.filterwarnings("default", category=PendingDeprecationWarning)
    warnings.showwarning = make_showwarning(warnings.showwarning, drop_deprecation_warnings=True)
    install_log_check()
