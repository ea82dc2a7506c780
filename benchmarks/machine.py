"""The machine a benchmark ran on, as BENCHMARKS.md quotes it."""

from __future__ import annotations

import os
import platform

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
