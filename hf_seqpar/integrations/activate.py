"""Switch sequence parallelism on in an unmodified Trainer / SFTTrainer script: the hooks of loaders.py and
trainer.py, installed once before the script's own code runs."""

from __future__ import annotations

from ..config import SeqParConfig
from .loaders import install_data_loader_hook
from .memory import install_memory_savings_hook
from .trainer import install_trainer_hook


def activate(config: SeqParConfig) -> None:
    """Switch sequence parallelism on for every Trainer this process builds from now on. Idempotent.

    Call it before the script's own code runs (`python -m hf_seqpar script.py` does). With sp_size=1 only the memory
    savings the config asks for are switched on (every Trainer's model gets them); without any, nothing changes."""
    if config.sp_size == 1:
        if config.memory_savings:
            install_memory_savings_hook(config)
        return
    install_data_loader_hook()
    install_trainer_hook(config)
