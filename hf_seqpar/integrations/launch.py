"""`hf-seqpar launch`: `accelerate launch` plus a `hf_seqpar:` section in the accelerate config file.

Stock accelerate refuses unknown top-level keys and cannot carry nested ones to the workers (hf_integration.md §1.2),
so the section is stripped into a temporary copy of the file and exported as `HF_SEQPAR_*`, which every worker
inherits. Each worker starts as `python -m hf_seqpar script.py args`, which switches sequence parallelism on before the
script runs. Options, config merging and launchers are accelerate's own. One exception: accelerate runs a MULTI_CPU
config as a single process unless mpirun is configured, so such a run goes to accelerate's torchrun launcher instead,
with ACCELERATE_USE_CPU=true so that every worker gets a gloo group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from ..config import SeqParConfig

SECTION = "hf_seqpar"
ENV_PREFIX = "HF_SEQPAR_"


def read_config_file(path: str | os.PathLike) -> tuple[SeqParConfig | None, dict]:
    """(the `hf_seqpar:` section of an accelerate config file as a SeqParConfig, or None; the file's other keys)."""
    path = Path(path)
    text = path.read_text()
    data = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"hf_seqpar: {path}: an accelerate config file must be a mapping, got {type(data).__name__}")
    section = data.pop(SECTION, None)
    if section is None:
        return None, data
    if not isinstance(section, dict):
        raise ValueError(
            f"hf_seqpar: {path}: the '{SECTION}:' section must be a mapping of SeqParConfig fields, got {section!r}"
        )
    known = [f.name for f in dataclasses.fields(SeqParConfig)]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(
            f"hf_seqpar: {path}: unknown keys {unknown} in the '{SECTION}:' section; the known keys are {known}"
        )
    return SeqParConfig(**section), data


def _write_like(original: Path, data: dict, directory: str) -> str:
    out = Path(directory) / f"accelerate_config{original.suffix or '.yaml'}"
    out.write_text(json.dumps(data) if original.suffix == ".json" else yaml.safe_dump(data))
    return str(out)


@contextlib.contextmanager
def _exported(env: dict[str, str]) -> Iterator[None]:
    """Workers inherit os.environ: set exactly these HF_SEQPAR_* (stale ones from the shell go), restore after."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _is_multi_cpu(args, cluster: dict) -> bool:
    """A multi-process CPU run that accelerate itself would start as one process (no mpirun hostfile)."""
    cpu = args.cpu or cluster.get("use_cpu") or cluster.get("distributed_type") == "MULTI_CPU"
    mpirun = args.mpirun_hostfile or (cluster.get("mpirun_config") or {}).get("mpirun_hostfile")
    processes = args.num_processes or cluster.get("num_processes") or 1
    machines = args.num_machines or cluster.get("num_machines") or 1
    return bool(cpu) and not mpirun and (processes > 1 or machines > 1)


def _as_multi_process_cpu(args, cluster: dict) -> None:
    """Let accelerate's torchrun launcher start the N CPU workers; ACCELERATE_USE_CPU gives them a gloo group."""
    if cluster.get("distributed_type", "MULTI_CPU") in ("MULTI_CPU", "NO"):  # FSDP / DeepSpeed pick torchrun anyway
        # Only here: ACCELERATE_USE_CPU makes every Accelerator a MULTI_CPU one, which drops a DeepSpeed config for
        # DDP (with zero3_init_flag the model is then already partitioned: the first forward fails on empty weights).
        os.environ["ACCELERATE_USE_CPU"] = "true"
        args.cpu, args.multi_gpu = False, True
    one_machine = (args.num_machines or cluster.get("num_machines") or 1) == 1
    if one_machine and args.main_process_port is None and cluster.get("main_process_port") is None:
        args.main_process_port = 0  # accelerate then picks a free port: parallel CPU runs do not collide


def launch(argv: Sequence[str]) -> None:
    """`hf-seqpar launch [accelerate launch options] script.py [script args]` (a failed worker raises)."""
    from accelerate.commands.config import default_config_file
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    parser.prog = "hf-seqpar launch"
    args = parser.parse_args(list(argv))
    if args.no_python:
        parser.error("--no_python: workers start as `python -m hf_seqpar script.py`, so the script must be Python")
    path = args.config_file
    if path is None and os.path.isfile(default_config_file) and not args.cpu:
        path = default_config_file  # what accelerate would read; it may hold a hf_seqpar section too
    config, cluster = read_config_file(path) if path else (None, {})
    if path is None and args.cpu:  # once --cpu becomes a torchrun launch, accelerate must not read a default file
        path, cluster = "cpu.yaml", {"distributed_type": "MULTI_CPU", "use_cpu": True}
    config = config or SeqParConfig.from_env()
    world = args.num_processes or cluster.get("num_processes")
    if world and world > 0 and world % config.parallel_size:
        what = f"sp_size={config.sp_size}" + (f" x tp_size={config.tp_size}" if config.tp_size > 1 else "")
        raise ValueError(f"hf_seqpar: {what} must divide world_size={world} (num_processes)")

    # Every worker runs `python -m hf_seqpar [-m] script args`: SP is switched on before the script's own code.
    script = [args.training_script, *args.training_script_args]
    args.training_script_args = (["-m"] if args.module else []) + script
    args.training_script, args.module = "hf_seqpar", True

    env = config.to_env()
    with tempfile.TemporaryDirectory(prefix="hf_seqpar_launch_") as tmp, _exported(env):
        if path:
            args.config_file = _write_like(Path(path), cluster, tmp)  # the file without its hf_seqpar section
        if _is_multi_cpu(args, cluster):
            _as_multi_process_cpu(args, cluster)
        launch_command(args)
