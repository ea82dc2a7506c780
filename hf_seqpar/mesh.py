"""`SeqParGroups`: the data-parallel x sequence-parallel (x tensor-parallel) process groups of this rank
(torch.distributed only).

Global rank = (dp_rank * sp_size + sp_rank) * tp_size + tp_rank: tensor-parallel ranks are innermost (NVLink
neighbours), then the SP group, then data parallelism. With tp_size=1, consecutive global ranks form one SP group
(0..sp-1, sp..2sp-1, ...). Inside an SP group, consecutive SP ranks form one Ulysses group and SP ranks with the same
Ulysses index form a ring. The "row" group holds every rank with a piece of the same rows (sp_size * tp_size of
them: SP shard, then its tensor-parallel piece). Groups come from DeviceMesh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .config import SeqParConfig


@dataclass(frozen=True)
class SeqParGroups:
    sp_group: dist.ProcessGroup | None
    sp_rank: int
    sp_size: int
    dp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int
    mesh: DeviceMesh | None = None
    splits: dict[int, tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]] = field(default_factory=dict)
    tp_group: dist.ProcessGroup | None = None
    tp_rank: int = 0
    tp_size: int = 1
    row_group: dist.ProcessGroup | None = None  # sp x tp ranks holding one row's pieces (tp_size > 1 only)
    shard_grad_group: dist.ProcessGroup | None = None  # dp x sp ranks holding the same weight shards (tp_size > 1)

    @property
    def rows(self) -> tuple[dist.ProcessGroup | None, int, int]:
        """(group, rank, size) over the ranks that hold pieces of the same rows: the SP group when tp_size=1;
        otherwise sp_size * tp_size ranks, ordered SP shard first, then its tensor-parallel piece."""
        if self.tp_size == 1:
            return self.sp_group, self.sp_rank, self.sp_size
        return self.row_group, self.sp_rank * self.tp_size + self.tp_rank, self.sp_size * self.tp_size

    def split_groups(self, ulysses_size: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(ulysses group, ring group) of this rank for a ulysses_size x ring split; None for a size-1 side."""
        if ulysses_size == 1:
            return None, self.sp_group
        if ulysses_size == self.sp_size:
            return self.sp_group, None
        if ulysses_size not in self.splits:
            raise ValueError(
                f"hf_seqpar: no process groups for ulysses_size={ulysses_size} (built: {sorted(self.splits)}); "
                "create the groups with init_groups(config) using this split or mode='auto'"
            )
        return self.splits[ulysses_size]


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _splits_to_build(config: SeqParConfig) -> list[int]:
    if config.mode == "usp":
        return [config.split[0]]
    if config.mode == "auto":
        return [u for u in range(2, config.sp_size) if config.sp_size % u == 0]
    return []


def init_groups(config: SeqParConfig) -> SeqParGroups:
    """Build this rank's groups for `config`. Collective: every rank of the world must call it."""
    if not dist.is_available() or not dist.is_initialized():
        if config.parallel_size == 1:
            return SeqParGroups(sp_group=None, sp_rank=0, sp_size=1, dp_group=None, dp_rank=0, dp_size=1)
        raise ValueError(
            f"hf_seqpar: sp_size={config.sp_size} x tp_size={config.tp_size} needs torch.distributed to be "
            "initialised first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % config.parallel_size != 0:
        what = f"sp_size={config.sp_size}" if config.tp_size == 1 else f"sp_size * tp_size={config.parallel_size}"
        raise ValueError(
            f"hf_seqpar: {what} must divide world_size={world}; use a size among "
            f"{[d for d in range(1, world + 1) if world % d == 0]}"
        )
    if config.tp_size > 1:
        return _init_tp_groups(config, world, rank)
    dp, sp = world // config.sp_size, config.sp_size
    device = _device_type()
    mesh = DeviceMesh(device, torch.arange(world).view(dp, sp), mesh_dim_names=("dp", "sp"))
    splits = {}
    for u in _splits_to_build(config):
        split_mesh = DeviceMesh(
            device, torch.arange(world).view(dp, sp // u, u), mesh_dim_names=("dp", "ring", "ulysses")
        )
        splits[u] = (split_mesh.get_group("ulysses"), split_mesh.get_group("ring"))
    return SeqParGroups(
        sp_group=mesh.get_group("sp"),
        sp_rank=rank % sp,
        sp_size=sp,
        dp_group=mesh.get_group("dp"),
        dp_rank=rank // sp,
        dp_size=dp,
        mesh=mesh,
        splits=splits,
    )


def _init_tp_groups(config: SeqParConfig, world: int, rank: int) -> SeqParGroups:
    """The (dp, sp, tp) mesh, tensor-parallel ranks innermost; the attention groups are those of one tp index."""
    dp, sp, tp = world // config.parallel_size, config.sp_size, config.tp_size
    device = _device_type()
    ranks = torch.arange(world)
    mesh = DeviceMesh(device, ranks.view(dp, sp, tp), mesh_dim_names=("dp", "sp", "tp"))
    rows = DeviceMesh(device, ranks.view(dp, sp * tp), mesh_dim_names=("dp", "row"))
    shards = DeviceMesh(device, ranks.view(dp * sp, tp), mesh_dim_names=("dpsp", "tp"))
    splits = {}
    for u in _splits_to_build(config):
        split_mesh = DeviceMesh(device, ranks.view(dp, sp // u, u, tp), mesh_dim_names=("dp", "ring", "ulysses", "tp"))
        splits[u] = (split_mesh.get_group("ulysses"), split_mesh.get_group("ring"))
    return SeqParGroups(
        sp_group=mesh.get_group("sp"),
        sp_rank=rank // tp % sp,
        sp_size=sp,
        dp_group=mesh.get_group("dp"),
        dp_rank=rank // (sp * tp),
        dp_size=dp,
        mesh=mesh,
        splits=splits,
        tp_group=mesh.get_group("tp"),
        tp_rank=rank % tp,
        tp_size=tp,
        row_group=rows.get_group("row"),
        shard_grad_group=shards.get_group("dpsp"),
    )
