"""The one place that wraps functions of transformers / accelerate (no public hook exists for what we need).

Each wrap carries a key (the config it serves): `install` with the same key finds its own wrapper and does nothing;
with another key the new wrapper replaces ours (the latest activation wins, never a silent mix of two). Each checks
the parameters it relies on when installed (`check_params`), so an upstream rename fails at activation, naming the
versions.
"""

from __future__ import annotations

import functools
import inspect

import torch.distributed as dist

ORIGINAL_ATTR = "__hf_seqpar_original__"  # set on every wrapper: the function it replaced
KEY_ATTR = "__hf_seqpar_key__"  # set on every wrapper: what it was installed for (e.g. ("trainer", config))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_params(fn, names: tuple[str, ...], what: str) -> None:
    """Fail at install time, naming the version, if `fn` lost a parameter the hook relies on."""
    missing = [name for name in names if name not in inspect.signature(fn).parameters]
    if missing:
        raise RuntimeError(
            f"hf_seqpar: cannot hook {what}: its parameters {missing} are gone in the installed version "
            f"({versions()}); hf_seqpar supports transformers 5.x and accelerate 1.1x"
        )


def versions() -> str:
    import accelerate
    import transformers

    return f"transformers {transformers.__version__}, accelerate {accelerate.__version__}"


def install(owner, name: str, make_wrapper, *, key=None) -> None:
    """Replace `owner.name` by `make_wrapper(original)`. A second call with an equal `key` finds the wrapper and does
    nothing; with another key it replaces our wrapper (wrapping the original again: the new key wins)."""
    current = getattr(owner, name)
    if hasattr(current, ORIGINAL_ATTR):
        if getattr(current, KEY_ATTR, None) == key:
            return
        current = getattr(current, ORIGINAL_ATTR)
    wrapper = functools.wraps(current)(make_wrapper(current))
    setattr(wrapper, ORIGINAL_ATTR, current)
    setattr(wrapper, KEY_ATTR, key)
    setattr(owner, name, wrapper)


def uninstall(owner, name: str) -> None:
    """Put back what `install` replaced (nothing to do when `owner.name` is not our wrapper)."""
    current = getattr(owner, name)
    if hasattr(current, ORIGINAL_ATTR):
        setattr(owner, name, getattr(current, ORIGINAL_ATTR))
