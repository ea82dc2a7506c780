"""Switch sequence parallelism on in an unmodified Trainer / SFTTrainer script or accelerate loop: the hooks of
loaders.py, trainer.py and accelerator.py, installed before the script's own code runs."""

from __future__ import annotations

from ..config import SeqParConfig
from .accelerator import install_accelerator_hook, uninstall_accelerator_hook
from .loaders import install_data_loader_hook
from .patches import uninstall
from .trainer import install_trainer_hook


def activate(config: SeqParConfig) -> None:
    """Switch sequence parallelism on for every Trainer and every `Accelerator.prepare` of this process from now on.

    Call it before the script's own code runs (`python -m hf_seqpar script.py` does). With sp_size=1 only the memory
    savings the config asks for are switched on (every Trainer's and prepared model gets them). Idempotent for one
    config; a second call with another config replaces the first's hooks (the new config wins for what is built
    from then on), and a config with nothing to do removes them."""
    if config.parallel_size == 1 and not config.memory_savings:
        uninstall("Trainer.__init__")
        uninstall_accelerator_hook()
        return
    install_accelerator_hook(config)
    if config.parallel_size > 1:
        install_data_loader_hook()
    install_trainer_hook(config)  # with sp_size=1: the memory savings only
