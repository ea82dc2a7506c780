"""The machine a benchmark ran on, as BENCHMARKS.md quotes it."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def machine_name(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} x{os.cpu_count()} cores"


def write_gloo_report(opts, results: list, **extra) -> dict:
    """A multi-process CPU (gloo) benchmark's results file at `opts.out`: the machine, torch, what it measured
    (`extra`), the run's settings and rows."""
    report = {
        "machine": machine_name("cpu"),
        "torch": torch.__version__,
        "backend": "gloo",
        **extra,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    return report
