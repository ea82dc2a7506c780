"""The "flash_attn" backend: flash-attn's variable-length kernels (softcap native) when the package is installed;
tiles (fp32, MLA head dims) through torch's kernels."""

from __future__ import annotations

import torch

from . import _compat
from .torch_backend import tile_kernel

__all__ = ["available", "tile_kernel", "varlen_impl"]


def available() -> bool:
    return _compat.flash_attn_available()


def varlen_impl(q: torch.Tensor, v: torch.Tensor, softcap: float | None) -> str | None:
    if not _compat.varlen_inputs_ok(q, v):
        return None
    return "flash_attn" if softcap is None or _compat.flash_softcap_supported() else None
