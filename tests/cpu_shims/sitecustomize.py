"""Test-only shims for sharded backends on CPU workers. Active only in processes whose PYTHONPATH holds this folder
(tests/test_backends.py puts it there), and there only in the workers that accelerate's FSDP / DeepSpeed launchers
start (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED=true, LOCAL_RANK set).

FSDP: accelerate enables FSDP only for GPU-like distributed types; a CPU worker becomes MULTI_CPU and the FSDP config
is dropped without a word, so an FSDP test on CPU would silently run DDP. Without CUDA, this makes accelerate's backend
choice report a gloo "MULTI_GPU" world on the CPU device (and start the gloo group, which accelerate otherwise leaves
to its MULTI_CPU path); accelerate then wraps the model in torch FSDP2, which itself runs on gloo. The tests still
check that the parameters are DTensors: this file proves nothing by itself.

DeepSpeed: its CPU communication backend JIT-compiles a shared-memory all-reduce op with g++ when it starts (about
35 s on an idle 2-core machine, minutes on a loaded one, and a failure without a compiler). Training never uses that
op (only `inference_all_reduce` does), so the shim skips the build; the slow test of stock DeepSpeed runs without it.
"""

import os


def _force_fsdp_on_cpu() -> None:
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available():
        return
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")

    def prepare_backend_fsdp_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
        if not torch.distributed.is_initialized():  # accelerate skips this for TrainingArguments(use_cpu=True)
            torch.distributed.init_process_group("gloo")
        return "gloo", DistributedType.MULTI_GPU

    PartialState._prepare_backend = prepare_backend_fsdp_on_cpu


def _skip_deepspeed_shm_op_build() -> None:
    import importlib

    # by module path: the attribute deepspeed.comm.torch is the torch package, which deepspeed.comm re-exports
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None  # None: DeepSpeed's own "op not available" path


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


if "LOCAL_RANK" in os.environ and _flag("ACCELERATE_USE_FSDP"):
    _force_fsdp_on_cpu()
if "LOCAL_RANK" in os.environ and _flag("ACCELERATE_USE_DEEPSPEED"):
    _skip_deepspeed_shm_op_build()
