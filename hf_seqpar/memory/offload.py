"""Activation-checkpoint offload: the tensors a forward saves for backward wait in (pinned) CPU memory.

With gradient checkpointing, what a decoder keeps between forward and backward is each layer's input: layers x tokens
x hidden values, which at long context is the largest thing left on the device once the logits and MLP are chunked.
`CheckpointOffloader.saving()` is a `saved_tensors_hooks` context for the decoder's forward: each saved tensor of at
least `min_bytes` (parameters excepted: they stay where they are) is copied to the host, and copied back when backward
first needs it. The values are bit-for-bit the same, so the result is exact.

On CUDA the copy to the host runs on a side stream into pinned memory, so it overlaps the next layers' forward; the
device memory is handed back to the allocator only once the copy is done (`record_stream`). The copy back runs on the
compute stream when backward reaches the layer (no prefetch). Elsewhere the copies are synchronous; on a CPU-only run
host and device are one memory, so nothing is saved there (the copy only costs time), but the path is the same.
"""

from __future__ import annotations

import torch

DEFAULT_MIN_BYTES = 1 << 20  # smaller tensors (masks, positions, norms' statistics) are not worth a copy


class CheckpointOffloader:
    """Per-model offload state: the side streams it copies on (one per CUDA device), created on first use."""

    def __init__(self, *, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self.offloaded_bytes = 0  # total copied to the host so far (a statistic for tests and benchmarks)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def saving(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context under which saved tensors go to the host."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        with torch.no_grad():
            source = tensor.detach()
            if source.device.type != "cuda":
                return source.device, source.to("cpu", copy=True), None
            stream = self._side_stream(source.device)
            host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(source.device))  # the tensor is complete before we copy
            with torch.cuda.stream(stream):
                host.copy_(source, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            source.record_stream(stream)  # its device memory is not reused before the copy has read it
        return source.device, host, copied

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        if copied is None:
            return host.to(device)
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)
