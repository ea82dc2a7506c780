"""What backend='auto' picks: per (device, dtype class, mask class), the backends in order of preference; the first
one available serves the call. Rows come from measurement (`python benchmarks/backend_table.py --device cuda
--write` re-measures them on a GPU and rewrites this file); a row names only backends that are exact for its masks.

dtype class: half (fp16 / bf16), fp32, fp64. mask class: dense (causal or full, no documents, no window), window,
packed (documents, with or without a window).
"""

AUTO = {
    # one H200, torch 2.11, Llama-3-8B attention fwd+bwd at 16K-128K (gpu_2026-12.md): cuDNN 0.51-0.60 of FA2's time
    ("cuda", "half", "dense"): ("cudnn", "flash_attn", "torch"),
    # no cuDNN varlen op: FA2's varlen rounds serve documents and windows in a few calls per hop
    ("cuda", "half", "window"): ("flash_attn", "torch"),
    ("cuda", "half", "packed"): ("flash_attn", "torch"),
}
DEFAULT = ("torch",)  # fp32, fp64 and CPU: torch's fused kernels, the math path where they cannot
