"""The one place that wraps functions of transformers / accelerate (no public hook exists for what we need).

Each wrap is idempotent (`install` finds its own wrapper and does nothing) and checks the parameters it relies on
when installed (`check_params`), so an upstream rename fails at activation, naming the versions.
"""

from __future__ import annotations

import functools
import inspect

import torch.distributed as dist

ORIGINAL_ATTR = "__hf_seqpar_original__"  # set on every wrapper: the function it replaced


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


def install(owner, name: str, make_wrapper) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, once: a second call finds the wrapper and does nothing."""
    original = getattr(owner, name)
    if hasattr(original, ORIGINAL_ATTR):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, ORIGINAL_ATTR, original)
    setattr(owner, name, wrapper)
