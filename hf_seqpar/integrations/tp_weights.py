"""The weights split by tensor_parallel.py (`TensorParallelState`) and what they need around training: kept out
of DistributedDataParallel and reduced over the ranks holding the same shard, a gradient norm over the whole
model, and checkpoints in the plain model's format (gathered whole to save, cut back to pieces on load)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..mesh import SeqParGroups
from .tp_collectives import all_reduce_copy, gather_tp_pieces


class TensorParallelState:
    """The TP layout of one model: its groups, plan, and the parameters it split."""

    def __init__(self, groups: SeqParGroups, plan: dict[str, str]):
        self.groups, self.plan = groups, plan
        self.sharded: dict[str, int] = {}  # parameter name (relative to the base model) -> split dimension
        self.params: dict[int, torch.nn.Parameter] = {}  # id -> the split parameters themselves
        self.dims: dict[int, int] = {}  # id of a split parameter -> its split dimension
        self.hooks: list = []
        self.reducing = False  # grad hooks of a data-parallel wrap installed (see reduce_shard_grads)

    @property
    def size(self) -> int:
        return self.groups.tp_size


def plain_parameter_ratio(base: torch.nn.Module, state: TensorParallelState) -> float:
    """The plain model's non-embedding parameter count over this rank's (the Trainer's FLOP estimate counts them)."""
    local = base.num_parameters(exclude_embeddings=True)
    return (local + sum(p.numel() for p in state.params.values()) * (state.size - 1)) / local


def keep_out_of_ddp(model: torch.nn.Module, base: torch.nn.Module, state: TensorParallelState) -> None:
    """DistributedDataParallel over the world would broadcast rank 0's shards over every TP rank at construction
    and average different shards together: the split parameters are declared ignored (torch's documented switch
    for parameters a wrapper syncs itself), on every module the user may hand to DDP."""
    from torch.nn.parallel import DistributedDataParallel

    for owner in {id(model): model, id(base): base}.values():
        names = [n for n, p in owner.named_parameters() if id(p) in state.params]
        ignored = set(getattr(owner, "_ddp_params_and_buffers_to_ignore", ()))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(owner, sorted(ignored | set(names)))


def reduce_shard_grads(ddp: torch.nn.Module, state: TensorParallelState, world: int) -> None:
    """After a data-parallel wrap (DDP averages the other parameters over the world): each split parameter's
    gradient is summed over the dp x sp ranks that hold the same shard and divided by the world size, which is what
    the world average does for a replicated parameter whose loss is scaled by the world size (DESIGN.md)."""
    ignored = set(getattr(ddp, "parameters_to_ignore", ()))
    kept = [n for n, p in ddp.module.named_parameters() if id(p) in state.params and n not in ignored]
    if kept:
        raise RuntimeError(
            f"hf_seqpar: DistributedDataParallel would average the tensor-parallel shards {kept[:3]} over every "
            "rank; the model was wrapped before hf_seqpar split it. Switch the model before accelerator.prepare"
        )
    if state.reducing:
        return
    state.reducing = True
    group = state.groups.shard_grad_group

    def reduce(grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_copy(grad, group) / world

    for param in state.params.values():
        if param.requires_grad:
            state.hooks.append(param.register_hook(reduce))


def clip_grad_norm(parameters, max_norm: float, norm_type: float, state: TensorParallelState) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over a TP-split model: the norm of the whole model's gradient (split
    parameters' squares summed over the TP group; replicated ones, equal on every rank, counted once), the same
    clip coefficient on every rank."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    shard_ids = {id(p.grad) for p in state.params.values() if p.grad is not None}
    split = [g for g in grads if id(g) in shard_ids]
    whole = [g for g in grads if id(g) not in shard_ids]
    device = grads[0].device

    def total(gs):  # the max for the inf-norm, else the sum of |g|^p
        if not gs:
            return torch.zeros((), device=device)
        if norm_type == float("inf"):
            return torch.stack([g.detach().abs().max().float() for g in gs]).max()
        return sum(g.detach().float().abs().pow(norm_type).sum() for g in gs)

    split_part = total(split).reshape(1)
    if norm_type == float("inf"):
        dist.all_reduce(split_part, op=dist.ReduceOp.MAX, group=state.groups.tp_group)
        norm = torch.maximum(split_part[0], total(whole))
    else:
        dist.all_reduce(split_part, group=state.groups.tp_group)
        norm = (split_part[0] + total(whole)).pow(1 / norm_type)
    coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coefficient.to(g.dtype))
    return norm


def full_state_dict(model: torch.nn.Module, state: TensorParallelState, trainable_only: bool) -> dict:
    """`model.state_dict()` with every split tensor gathered whole over the TP group: what the plain model saves
    (collective: every rank calls it). `trainable_only`: the parameters that train only (a PEFT adapter's)."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if trainable_only and not getattr(tensor, "requires_grad", False):
            continue
        dim = state.dims.get(id(tensor))
        if dim is not None:
            tensor = gather_tp_pieces(tensor, state.groups, dim)
        out[name] = tensor.detach()
    return out


def load_piece_hook(state: TensorParallelState):
    """A state_dict load pre-hook: a whole (plain model's) tensor arriving for a split parameter is cut to this
    rank's piece, so checkpoints saved whole (`full_state_dict`) load into the split model."""

    def cut(module, state_dict, prefix, *args):
        for key, param in list(module.named_parameters(recurse=False)):
            dim = state.dims.get(id(param))
            incoming = state_dict.get(prefix + key)
            if dim is None or incoming is None or incoming.shape == param.shape:
                continue
            if incoming.shape[dim] != param.shape[dim] * state.size:
                raise ValueError(
                    f"hf_seqpar: {prefix}{key} of shape {tuple(incoming.shape)} cannot be split over tp_size="
                    f"{state.size} into {tuple(param.shape)}"
                )
            state_dict[prefix + key] = incoming.chunk(state.size, dim)[state.groups.tp_rank].clone()

    return cut


def whole_saves_only(save_pretrained):
    """`save_pretrained` of a TP-split model: without a `state_dict` it would write this rank's pieces under the
    whole tensors' names (the other ranks' pieces lost), so it is refused; the Trainer's save passes the whole one."""

    def save_pretrained_tp(save_directory, *args, **kwargs):
        if kwargs.get("state_dict") is None:
            raise NotImplementedError(
                "hf_seqpar: this model is split by tp_size > 1, and save_pretrained would write this rank's pieces "
                "only; save with trainer.save_model(...), or pass state_dict=hf_seqpar.integrations.tp_weights."
                "full_state_dict(model, state, trainable_only=...) (collective: every rank calls it)"
            )
        return save_pretrained(save_directory, *args, **kwargs)

    return save_pretrained_tp
