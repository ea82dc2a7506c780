"""The kernel backends by name: `SeqParConfig.backend` (config.KERNEL_BACKENDS: name -> module here) and "math",
the exactness reference. `pick` resolves "auto" per call from the mask, dtype and device (auto_table.py)."""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

import torch

from ..config import KERNEL_BACKENDS
from . import _compat, torch_backend
from .auto_table import AUTO, DEFAULT
from .mask import MaskSpec

# every tile through the math path (any dtype, float64 included): what the other backends are tested against
MATH = SimpleNamespace(
    available=lambda: True, varlen_impl=lambda q, v, softcap: None, tile_kernel=lambda *a: torch_backend.MATH
)
_MISSING = {
    "flash_attn": "needs the flash-attn package (pip install 'hf_seqpar[flash]')",
    "cudnn": "needs torch's cuDNN SDPA ops on a CUDA GPU of compute capability 8.0 or newer",
}


def module(name: str):
    """The backend's module (available(), varlen_impl(q, v, softcap), tile_kernel(q, v, softcap, kind))."""
    return MATH if name == "math" else import_module(f".{KERNEL_BACKENDS[name]}", __package__)


def check(backend: str) -> str:
    """Refuse unknown names and backends this machine lacks; 'auto' is resolved per call by `pick`."""
    if backend not in ("auto", "math", *KERNEL_BACKENDS):
        raise ValueError(f"hf_seqpar: backend={backend!r} is not one of {('auto', *KERNEL_BACKENDS)}")
    if backend not in ("auto", "math") and not module(backend).available():
        raise ValueError(f"hf_seqpar: backend={backend!r} {_MISSING.get(backend, 'is not available here')}")
    return backend


def classes(q: torch.Tensor, spec: MaskSpec) -> tuple[str, str, str]:
    """The auto table's key for these inputs: (device, dtype class, mask class)."""
    dtype = "half" if q.dtype in (torch.float16, torch.bfloat16) else "fp64" if q.dtype == torch.float64 else "fp32"
    mask = "packed" if spec.docs is not None else "window" if spec.window is not None else "dense"
    return "cuda" if _compat.on_cuda(q) else "cpu", dtype, mask


def pick(backend: str, q: torch.Tensor, spec: MaskSpec) -> str:
    """The backend that serves this call: `backend` itself, or for 'auto' the first available of its table row."""
    if backend != "auto":
        return backend
    return next((name for name in AUTO.get(classes(q, spec), DEFAULT) if module(name).available()), "torch")
