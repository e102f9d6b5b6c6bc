"""Who am I in a distributed job: rank, world size, device, read once and passed around (never stored globally).

`dist_info()` reads RANK, LOCAL_RANK and WORLD_SIZE as torchrun sets them (nanoGPT does the same) and returns a
frozen `DistInfo`. Code that communicates takes its process group as an argument (docs/authoring.md, "Code style"); this module only
answers questions about the current process.

Launch with torchrun on GPUs:   torchrun --nproc_per_node 2 -m lab03_data_parallel.benchmark
or from Python/tests on CPU:    common.launch.run_distributed(fn, world_size=4)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    device: torch.device  # cuda:local_rank under NCCL, cpu under gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_backend(world_size: int) -> str:
    """NCCL when every rank can have its own GPU, otherwise gloo on CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def dist_info() -> DistInfo:
    """Describe this process from the environment (single-process defaults when not launched)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = dist.get_backend() if dist.is_initialized() else pick_backend(world_size)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend, device=device)


def init_from_env() -> DistInfo:
    """Initialise the default process group from torchrun's environment and return this process's DistInfo."""
    info = dist_info()
    if info.backend == "nccl":
        # NVLink multicast (NVLS) stays off on shared hosts: see docs/gpu.md
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(info.device)
    if not dist.is_initialized():
        dist.init_process_group(info.backend, rank=info.rank, world_size=info.world_size)
    return info
