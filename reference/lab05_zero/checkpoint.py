"""Sharded checkpoints that load at another world size, written with torch.distributed.checkpoint (DCP).

What it saves: time and host memory at save and load. No rank gathers the model: each writes only its part, in
parallel, and a run on N' ranks reads back only what it owns. The catch is that ZeRO's flat layout depends on N
(padding, and where shard boundaries cut parameters), so a checkpoint written in that layout could only be read by
the same N. The checkpoint therefore stores *per-parameter* tensors, each flattened to 1-D and split in torch.chunk
fashion, a layout that DCP knows how to re-split (a DTensor sharded on dim 0):

    parameter i (n_i elements):   chunk c = ceil(n_i / N);  rank r writes elements [r*c, min((r+1)*c, n_i))

Keys: "model.<name>" (the fp32 master weights), "optim.exp_avg.<name>", "optim.exp_avg_sq.<name>", "optim.step", and
"frozen.<name>" (replicated; DCP writes one copy). To save, each unit's flat shards are all-gathered (one unit at a
time, the transient cost of ZeRO-3's gather in fp32) and each rank cuts its chunks; to load, DCP fills the chunks
of the new world size, each parameter is all-gathered (`DTensor.full_tensor`) and each rank keeps its slice of the
new flat layout. The optimizer state goes with the weights, so training resumes exactly, at any N and any stage.

Usage:
    save_checkpoint(engine, "ckpt/step100")           # every rank, same path (a shared file system)
    load_checkpoint(engine2, "ckpt/step100")          # engine2 may have another world size or stage
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .flat import all_gather_flat

STATE_KINDS = ("model", "optim.exp_avg", "optim.exp_avg_sq")

# -----------------------------------------------------------------------------
# Public entry points


def save_checkpoint(engine: nn.Module, path: str) -> None:
    """Write the engine's master weights, optimizer state and frozen parameters to the DCP checkpoint `path`."""
    dcp.save(checkpoint_state(engine), checkpoint_id=path)


def load_checkpoint(engine: nn.Module, path: str) -> None:
    """Read the DCP checkpoint `path` (written at any world size, by any stage) into `engine`.

    Raises:
        ValueError: the checkpoint's parameter shapes or dtypes do not fit the engine's model.
    """
    state = checkpoint_state(engine, empty=True)
    dcp.load(state, checkpoint_id=path)
    restore_state(engine, state)


# -----------------------------------------------------------------------------
# Between ZeRO's flat shards and per-parameter chunks


def chunk_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s torch.chunk piece of a 1-D tensor of `numel` elements (possibly empty).

    E.g. numel 10 on 4 ranks: chunks of ceil(10/4) = 3, so (0, 3), (3, 6), (6, 9), (9, 10); numel 2 on 4 ranks gives
    (0, 1), (1, 2), (2, 2), (2, 2).
    """
    # BEGIN SOLUTION
    chunk = -(-numel // world_size)
    return min(rank * chunk, numel), min((rank + 1) * chunk, numel)
    # END SOLUTION


def checkpoint_state(engine: nn.Module, *, empty: bool = False) -> dict[str, object]:
    """The DCP state dict of `engine`: per-parameter 1-D DTensors sharded on dim 0 over the engine's group.

    Args:
        engine: a ZeRO1/ZeRO2/ZeRO3 engine.
        empty: allocate the tensors without filling them (the templates that `dcp.load` fills).

    Returns:
        {"model.<name>": DTensor (n,), "optim.exp_avg.<name>": ..., "optim.exp_avg_sq.<name>": ...,
         "optim.step": int64 scalar tensor, "frozen.<name>": tensor}.
    """
    group, optimizer = engine.group, engine.optimizer
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    device = engine.groups[0].shard.device if engine.groups else torch.device("cpu")
    mesh = DeviceMesh.from_group(group or dist.group.WORLD, device.type)
    state: dict[str, object] = {"optim.step": torch.tensor(optimizer.step_count, dtype=torch.int64)}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            state[f"frozen.{name}"] = torch.empty_like(param) if empty else param.detach().clone()
    for index, flat_group in enumerate(engine.groups):
        shards = (optimizer.masters[index], optimizer.exp_avg[index], optimizer.exp_avg_sq[index])
        for kind, shard in zip(STATE_KINDS, shards):
            # BEGIN SOLUTION
            full = None
            if not empty:  # the whole unit, one unit at a time (collectives need device tensors)
                full = torch.empty(flat_group.layout.padded_numel, dtype=shard.dtype, device=device)
                all_gather_flat(full, shard.to(device), group=group)
            for name, offset, shape in zip(flat_group.names, flat_group.layout.offsets, flat_group.layout.shapes):
                numel = shape.numel()
                start, stop = chunk_range(numel, world_size, rank)
                if empty:
                    local = torch.empty(stop - start, dtype=shard.dtype, device=device)
                else:
                    local = full[offset + start: offset + stop].clone()
                state[f"{kind}.{name}"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                                             shape=torch.Size([numel]), stride=(1,))
            # END SOLUTION
    return state


@torch.no_grad()
def restore_state(engine: nn.Module, state: dict[str, object]) -> None:
    """Copy a loaded state dict into the engine: master shards, moments and step; then the parameters themselves
    (each rank's parameter shard from its master, all-gathered for stages 1 and 2); frozen parameters as they are."""
    group, optimizer = engine.group, engine.optimizer
    rank = dist.get_rank(group)
    optimizer.step_count = int(state["optim.step"])
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            param.copy_(state[f"frozen.{name}"])
    for index, flat_group in enumerate(engine.groups):
        targets = (optimizer.masters[index], optimizer.exp_avg[index], optimizer.exp_avg_sq[index])
        for kind, target in zip(STATE_KINDS, targets):
            # BEGIN SOLUTION
            full = torch.zeros(flat_group.layout.padded_numel, dtype=target.dtype, device=target.device)
            for name, offset, shape in zip(flat_group.names, flat_group.layout.offsets, flat_group.layout.shapes):
                value = state[f"{kind}.{name}"].full_tensor()  # (n,) all-gathered from the chunks
                full[offset: offset + shape.numel()].copy_(value)
            target.copy_(full[flat_group.layout.shard_slice(rank)])
            # END SOLUTION
        # BEGIN SOLUTION
        flat_group.shard.copy_(optimizer.masters[index])  # cast to the in-flight dtype
        if engine.config.stage < 3:
            all_gather_flat(flat_group.full, flat_group.shard.clone(), group=group)
        # END SOLUTION
