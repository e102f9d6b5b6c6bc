"""The process mesh: ranks laid out as a dp x pp x tp grid, with one process group per axis.

Labs 04 (tensor and pipeline parallelism), 05 (ZeRO), 09 (expert parallelism) and 10 (the planner) all need to know,
for the current rank, who shares its tensor-parallel group, which pipeline stage it is, and which ranks hold the same
shard in other data-parallel replicas. torch's DeviceMesh (`init_device_mesh`) builds those groups; this module only
fixes the axis order and names and returns them (never stores them globally, docs/authoring.md, "Code style").

Layout: tp varies fastest, then pp, then dp (Megatron-LM's order), so the ranks of one tensor-parallel group are
neighbours, on one node's NVLink when there are several nodes:

    world 8 = dp 2 x pp 2 x tp 2        rank = (dp_rank * pp + pp_rank) * tp + tp_rank
    tp groups  {0,1} {2,3} {4,5} {6,7}
    pp groups  {0,2} {1,3} {4,6} {5,7}
    dp groups  {0,4} {1,5} {2,6} {3,7}

Usage (inside a process group of world size dp * pp * tp, e.g. a worker of common.launch.run_distributed):
    mesh = build_mesh(dp=2, pp=1, tp=2)
    mesh.tp_group, mesh.tp_rank, mesh.tp_size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the dp x pp x tp grid, and the group of each axis."""

    device_mesh: DeviceMesh
    dp_size: int
    pp_size: int
    tp_size: int

    def group(self, axis: str) -> dist.ProcessGroup:
        """The process group of the ranks that differ from this one along `axis` only."""
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        return self.device_mesh.get_group(axis)

    def coordinate(self, axis: str) -> int:
        """This rank's index along `axis`."""
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        return self.device_mesh.get_local_rank(axis)

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along `axis`, in order of their coordinate."""
        return dist.get_process_group_ranks(self.group(axis))

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.group("pp")

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.group("tp")

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def pp_rank(self) -> int:
        return self.coordinate("pp")

    @property
    def tp_rank(self) -> int:
        return self.coordinate("tp")


def build_mesh(*, dp: int = 1, pp: int = 1, tp: int = 1, device_type: str | None = None) -> Mesh:
    """The dp x pp x tp mesh over the default process group (which must already be initialised).

    Args:
        dp, pp, tp: the axis sizes, each >= 1; their product must be the world size.
        device_type: "cpu" (gloo) or "cuda" (NCCL); default: the default group's backend decides.

    Raises:
        ValueError: a size < 1, or a product that is not the world size (naming all the numbers).
        RuntimeError: no default process group.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised default process group (dist.init_process_group)")
    for name, size in (("dp", dp), ("pp", pp), ("tp", tp)):
        if size < 1:
            raise ValueError(f"mesh size {name} must be >= 1, got {size}")
    world = dist.get_world_size()
    if dp * pp * tp != world:
        raise ValueError(f"dp ({dp}) x pp ({pp}) x tp ({tp}) = {dp * pp * tp} must equal the world size ({world})")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" and torch.cuda.is_available() else "cpu"
    device_mesh = init_device_mesh(device_type, (dp, pp, tp), mesh_dim_names=AXES)
    return Mesh(device_mesh=device_mesh, dp_size=dp, pp_size=pp, tp_size=tp)


def mesh_rank(*, dp_rank: int, pp_rank: int, tp_rank: int, pp: int, tp: int) -> int:
    """The global rank at grid coordinates (dp_rank, pp_rank, tp_rank): tp fastest, then pp, then dp."""
    return (dp_rank * pp + pp_rank) * tp + tp_rank


# -----------------------------------------------------------------------------
# Sharding tensors along a mesh axis (labs 04, 05, 09, 10)


def shard_along(tensor: torch.Tensor, dim: int, *, index: int, num_shards: int, what: str = "tensor") -> torch.Tensor:
    """Shard `index` of `num_shards` equal slices of `tensor` along `dim` (a contiguous copy, never a view).

    Shard i holds elements [i * S, (i + 1) * S) of that dim, with S = size / num_shards: the layout a tensor-parallel
    rank, or an expert-parallel rank, holds.

    Raises:
        ValueError: num_shards < 1, an index outside [0, num_shards), or a size num_shards does not divide (the
            message names `what`, the size and num_shards).
    """
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"shard index ({index}) must be in [0, num_shards ({num_shards}))")
    size = tensor.shape[dim]
    if size % num_shards:
        raise ValueError(f"{what}: size {size} along dim {dim} is not divisible by the number of shards ({num_shards})")
    step = size // num_shards
    return tensor.narrow(dim, index * step, step).clone(memory_format=torch.contiguous_format)


def gather_along(tensor: torch.Tensor, dim: int, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The inverse of `shard_along` across `group`: every rank's shard, concatenated along `dim` in rank order.

    A plain all-gather (no autograd): for checking and reporting, not for the forward of a model.
    """
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)
