"""`hf-seqpar estimate`: memory per GPU, the split to use, and communication against compute, before renting GPUs.

Analytic, from the model's config.json (or a preset) and the run's shape. The memory terms follow what a Hugging Face
decoder stores during one training step (per local token and layer, from the modules' autograd saves: the residual
stream, two RMSNorm intermediates and output, q / k / v after RoPE, the attention output, the four MLP
intermediates); they are checked against benchmarks/memory.py's measurements (tests/test_estimate.py).
Communication uses the same per-layer formulas as benchmarks/comm_volume.py (attention) and
benchmarks/tp_comm_volume.py (tensor parallelism's all-gathers and reduce-scatters), which measure them on gloo.
`--tp-size` estimates TP x SP (SeqParConfig.tp_size); the report compares SP alone with every TP x SP layout.
"""

from __future__ import annotations

from .comm import comm_bytes_per_layer, kv_heads_sent, recommend, step_times, tp_comm_bytes_per_layer
from .memory import estimate_memory
from .report import RESERVE_GIB, SAVINGS, cli, layouts, max_context, report, verdict
from .shapes import DTYPE_BYTES, GIB, GPUS, PRESETS, GpuSpec, ModelShape, load_model

__all__ = [
    "DTYPE_BYTES",
    "GIB",
    "GPUS",
    "PRESETS",
    "RESERVE_GIB",
    "SAVINGS",
    "GpuSpec",
    "ModelShape",
    "cli",
    "comm_bytes_per_layer",
    "estimate_memory",
    "kv_heads_sent",
    "layouts",
    "load_model",
    "max_context",
    "recommend",
    "report",
    "step_times",
    "tp_comm_bytes_per_layer",
    "verdict",
]
