"""Test-only transport: the collectives hf_seqpar calls, staged through host memory on gloo.

Why: the GPU tests run whole models in 2 or 4 processes that share ONE GPU. NCCL refuses two ranks on one device,
and gloo with CUDA tensors does all-to-all but not P2P (`batch_isend_irecv` fails with "writev: Bad address"), so
ring attention could not run that way. Under `host_staged_comm()` every collective below copies its CUDA (or CPU)
inputs into fresh host buffers, runs the gloo op on those, and copies the results back into the caller's tensors:
P2P receives in `wait()`, the rest before returning. The data and the op order are the caller's; only the buffers
move, so on CPU the results equal the unstaged ones exactly (tests/gpu/test_models_gpu.py checks that).

This is never the product path (that stays NCCL, one GPU per rank): it is installed only by tests, inside the
worker processes of tests/_ranks.py, by replacing attributes of `torch.distributed` that hf_seqpar looks up at call
time (algorithms/comm.py, algorithms/_compat.py, integrations/loss.py and moe.py).

Staged: batch_isend_irecv, all_to_all_single, all_reduce, all_gather_single / all_gather_into_tensor and
reduce_scatter_single / reduce_scatter_tensor. The last two run as gloo's list all_gather and all_reduce + slice,
which gloo has in every torch version (its reduce-scatter does not take CUDA tensors and is missing in old ones).
Synchronous calls only (hf_seqpar makes no async collective calls besides P2P).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous host copy (also on CPU, so the CPU test runs the same staging as the GPU)."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t)


def _host_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu")


class _StagedWork:
    """The batch's gloo works; `wait()` waits for all of them, then copies each received buffer to its tensor."""

    def __init__(self, works, copies, keep):
        self._works, self._copies, self._keep = works, copies, keep  # keep: send buffers gloo reads meanwhile

    def wait(self, timeout=None) -> bool:
        for work in self._works:
            work.wait()
        for dst, host in self._copies:
            dst.copy_(host)
        self._works, self._copies, self._keep = [], [], []
        return True

    def is_completed(self) -> bool:
        return not self._works


def _no_async(name: str, async_op: bool) -> None:
    if async_op:
        raise NotImplementedError(f"host_staged_comm: {name}(async_op=True) is not staged (hf_seqpar makes none)")


def _staged(original: dict) -> dict:
    """The replacements, each calling the saved `original[name]` on host buffers."""

    def batch_isend_irecv(p2p_op_list):
        host_ops, copies, keep = [], [], []
        for op in p2p_op_list:
            kind = getattr(op.op, "__name__", "")
            if kind not in ("isend", "irecv"):
                raise NotImplementedError(f"host_staged_comm: P2P op {op.op!r}")
            if kind == "isend":
                host = _to_host(op.tensor)
                keep.append(host)
            else:
                host = _host_like(op.tensor)
                copies.append((op.tensor, host))
            host_ops.append(dist.P2POp(op.op, host, op.peer, op.group, op.tag))
        return [_StagedWork(original["batch_isend_irecv"](host_ops), copies, keep)]

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):  # fmt: skip
        _no_async("all_to_all_single", async_op)
        host_out = _host_like(output)
        original["all_to_all_single"](host_out, _to_host(input), output_split_sizes, input_split_sizes, group=group)
        output.copy_(host_out)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        _no_async("all_reduce", async_op)
        host = _to_host(tensor)
        original["all_reduce"](host, op=op, group=group)
        tensor.copy_(host)

    def all_gather_flat(output, input, group=None, async_op=False):
        _no_async("all_gather_into_tensor", async_op)
        host_in = _to_host(input)
        chunks = [_host_like(host_in) for _ in range(dist.get_world_size(group))]
        original["all_gather"](chunks, host_in, group=group)
        output.view(-1).copy_(torch.cat([c.view(-1) for c in chunks]))  # rank order, as [P * n, ...]

    def reduce_scatter_flat(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        _no_async("reduce_scatter_tensor", async_op)
        host = _to_host(input)
        original["all_reduce"](host, op=op, group=group)
        rows = host.view(dist.get_world_size(group), -1)[dist.get_rank(group)]  # this rank's n rows of [P * n]
        output.view(-1).copy_(rows)

    return {
        "batch_isend_irecv": batch_isend_irecv,
        "all_to_all_single": all_to_all_single,
        "all_reduce": all_reduce,
        "all_gather_single": all_gather_flat,
        "all_gather_into_tensor": all_gather_flat,
        "reduce_scatter_single": reduce_scatter_flat,
        "reduce_scatter_tensor": reduce_scatter_flat,
    }


@contextlib.contextmanager
def host_staged_comm(enabled: bool = True):
    """Within the block, the collectives listed in the module docstring run on host copies (this process only).
    Names this torch lacks (all_gather_single before 2.13) stay absent, so `_compat` picks the same one as before."""
    if not enabled:
        yield
        return
    original = {name: getattr(dist, name) for name in ("batch_isend_irecv", "all_to_all_single", "all_reduce",
                                                       "all_gather")}  # fmt: skip
    saved = {}
    for name, fn in _staged(original).items():
        if hasattr(dist, name):
            saved[name] = getattr(dist, name)
            setattr(dist, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
