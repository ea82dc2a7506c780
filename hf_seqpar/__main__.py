"""Entry points that switch sequence parallelism on without changing a training script.

`python -m hf_seqpar script.py [args]` (or `-m module [args]`): read `HF_SEQPAR_*`, install the hooks, then run the
script exactly as `python script.py [args]` would. This is the worker command of `hf-seqpar launch`, and works under
`accelerate launch ... -m hf_seqpar script.py` and `torchrun ... -m hf_seqpar script.py` too.

`hf-seqpar launch [accelerate launch options] script.py [args]` (`cli`): `accelerate launch` plus a `hf_seqpar:`
section in the accelerate config file.
"""

from __future__ import annotations

import gc
import os
import runpy
import sys
from collections.abc import Sequence

RUN_USAGE = "usage: python -m hf_seqpar script.py [args] | python -m hf_seqpar -m module [args]  (reads HF_SEQPAR_*)"
CLI_USAGE = (
    "usage: hf-seqpar launch [accelerate launch options] script.py [script args]\n"
    "       hf-seqpar estimate --model CONFIG_OR_PRESET --seq-len N --gpus G [--gpu h100|h200|a100] [--lora] ..."
)


def run(argv: Sequence[str]) -> None:
    """Activate from the environment, then run the script or module as `__main__` with its own argv."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(RUN_USAGE, file=sys.stderr)
        raise SystemExit(2)
    from .config import SeqParConfig

    config = SeqParConfig.from_env()
    if config.parallel_size > 1 or config.memory_savings:
        from .integrations.activate import activate  # imports transformers: only when there is something to do

        activate(config)
    if config.parallel_size == 1 and os.environ.get("RANK", "0") == "0":
        savings = f"; memory savings on: {', '.join(config.memory_savings)}" if config.memory_savings else ""
        print(f"hf_seqpar: sp_size=1, sequence parallelism is off{savings}", flush=True)
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` puts it first
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code in (None, 0):
            _destroy_process_groups()
        raise
    _destroy_process_groups()


def _destroy_process_groups() -> None:
    """Tear the process groups down while the interpreter is fully alive, in the one order gloo survives.

    Most scripts never destroy their groups; left to interpreter finalization, gloo's worker threads can still hold
    tensors of finished collectives and abort the process (pytorch/pytorch#190489). And a group must not die inside
    DDP's reducer, which holds the GIL while gloo's threads may need it (pytorch/pytorch#56297): so the registry lets
    go first, then the models (gc), and the activation's own references last."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    for name in ("hf_seqpar.integrations.trainer", "hf_seqpar.integrations.accelerator"):
        hook = sys.modules.get(name)
        if hook is not None:
            hook.release_process_groups()


def cli(argv: Sequence[str] | None = None) -> None:
    """The `hf-seqpar` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["estimate"]:
        from .estimate import cli as estimate  # arithmetic on a config: no torch.distributed, no transformers

        return estimate(argv[1:])
    if not argv or argv[0] != "launch":
        print(CLI_USAGE, file=sys.stderr)
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    from .integrations.launch import launch

    try:
        launch(argv[1:])
    except ValueError as err:  # bad config: one clear line, not a traceback
        raise SystemExit(f"hf-seqpar launch: error: {err}") from None


if __name__ == "__main__":
    run(sys.argv[1:])
