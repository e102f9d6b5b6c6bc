"""Flat parameter buffers and their shards: the data structure under every ZeRO stage.

What it saves: messages and copies. ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", arXiv:1910.02054) partitions a model's training state across the N ranks of a
data-parallel group. The partition is simplest on a flat buffer: the trainable parameters of one *unit* (a
transformer block, or the parameters outside the blocks) are laid end to end in one 1-D tensor, padded with zeros to a
multiple of N, and rank r owns one contiguous slice of it:

    n_i = numel of parameter i       o_i = n_0 + ... + n_{i-1}       Ψ_u = sum_i n_i
    padded = ceil(Ψ_u / N) * N        S = padded / N                  rank r owns flat[r*S : (r+1)*S]
    parameter i  is  flat[o_i : o_i + n_i].view(shape_i)

Every collective then moves one large message per unit (all-gather into the flat buffer, reduce-scatter out of
it), and the module's parameters are *views* into the buffer, so gathered weights are used without a copy (FSDP's
FlatParameter does the same: Zhao et al. 2023, "PyTorch FSDP", arXiv:2304.11277, Section 3.2). A parameter may
straddle two ranks' shards, and the padding sits at the end of the last shards; `pieces(rank)` says which part of
which parameter a rank's shard holds, which is what a checkpoint needs to translate between the flat layout (which
depends on N) and per-parameter tensors (which do not).

`shard_module` builds the units of a model: rank 0's values broadcast to every rank (as DDP does), the parameters
turned into views of a flat buffer in the in-flight dtype, and each rank's fp32 master shard cut out before the cast.

Usage:
    layout = FlatLayout.of([p.shape for p in params], world_size=4)
    flat = layout.flatten([p.detach() for p in params])     # (layout.padded_numel,)
    views = layout.views(flat)                               # one view per parameter, flat's storage
    shard = flat[layout.shard_slice(rank)]                   # (layout.shard_numel,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

# -----------------------------------------------------------------------------
# The layout


@dataclass(frozen=True)
class Piece:
    """Part of parameter `index` in one rank's shard: param.view(-1)[param_start : param_start + length] is
    shard[shard_start : shard_start + length]."""

    index: int
    param_start: int
    shard_start: int
    length: int


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter of a unit sits in its flat buffer, and the shard of each rank.

    Attributes:
        shapes: the parameters' shapes, in buffer order.
        offsets: o_i, the start of parameter i in the buffer.
        numel: Ψ_u, the number of parameter elements (without padding).
        padded_numel: Ψ_u rounded up to a multiple of world_size.
        world_size: N, the number of shards.
    """

    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int
    padded_numel: int
    world_size: int

    @property
    def shard_numel(self) -> int:
        """S = padded_numel / N, the elements of one rank's shard."""
        return self.padded_numel // self.world_size

    @staticmethod
    def of(shapes: Sequence[Sequence[int]], *, world_size: int) -> "FlatLayout":
        """The layout of parameters with these shapes laid end to end, padded to a multiple of world_size.

        Args:
            shapes: one shape per parameter (a 0-d parameter is shape ()).
            world_size: N >= 1.

        Returns:
            A FlatLayout; e.g. shapes [(3, 2), (5,)] at N=4 give offsets (0, 6), numel 11, padded_numel 12.

        Raises:
            ValueError: world_size < 1.
        """
        shapes = tuple(torch.Size(shape) for shape in shapes)
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: FlatLayout.of is not implemented yet (lab05_zero/flat.py)")

    def shard_slice(self, rank: int) -> slice:
        """The slice of the flat buffer that `rank` owns: [rank * S, (rank + 1) * S).

        Raises:
            ValueError: rank outside [0, world_size).
        """
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: FlatLayout.shard_slice is not implemented yet (lab05_zero/flat.py)")

    def flatten(self, tensors: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new flat buffer holding `tensors` end to end, then zeros up to padded_numel.

        Args:
            tensors: one tensor per parameter, with the layout's shapes, on one device.
            dtype: the buffer's dtype (default: the first tensor's).

        Returns:
            (padded_numel,) tensor on the tensors' device.

        Raises:
            ValueError: a different number of tensors, or a shape that is not the layout's.
        """
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: FlatLayout.flatten is not implemented yet (lab05_zero/flat.py)")

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One view of `flat` per parameter, with the parameter's shape (no copy: they share flat's storage).

        Raises:
            ValueError: flat is not 1-D with padded_numel elements.
        """
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: FlatLayout.views is not implemented yet (lab05_zero/flat.py)")

    def pieces(self, rank: int) -> list[Piece]:
        """The parts of parameters in `rank`'s shard, in buffer order (padding is in no piece).

        E.g. shapes [(3, 2), (5,)] at N=4 (S=3): rank 1 holds [Piece(0, 3, 0, 3)], rank 2 holds
        [Piece(1, 0, 0, 3)], rank 3 holds [Piece(1, 3, 0, 2)] and one element of padding.
        """
        shard = self.shard_slice(rank)
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: FlatLayout.pieces is not implemented yet (lab05_zero/flat.py)")


# -----------------------------------------------------------------------------
# Units of a model


@dataclass
class FlatGroup:
    """One unit's trainable parameters, flattened and sharded on this rank.

    Attributes:
        name: the unit's module name ("blocks.0"), or "root" for the parameters outside every unit.
        module: the unit's module (the whole model for "root").
        names: the parameters' names in the model, in buffer order.
        params: the parameters; after shard_module each is a view of `full`.
        layout: their FlatLayout.
        full: (padded_numel,) the gathered parameters, in the in-flight dtype. ZeRO-3 frees its storage between uses.
        shard: (shard_numel,) this rank's slice of the parameters. ZeRO-1/2: a view of `full`; ZeRO-3: its own tensor.
        grad: the gradient this rank keeps: ZeRO-1 the full (padded_numel,) flat gradient; ZeRO-2/3 the
            (shard_numel,) shard of the averaged gradient. None until a stage sets it.
    """

    name: str
    module: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    layout: FlatLayout
    full: torch.Tensor
    shard: torch.Tensor
    grad: torch.Tensor | None = None


def partition_parameters(module: nn.Module, units: Sequence[nn.Module]) -> list[tuple[str, nn.Module, list[str]]]:
    """Split the trainable parameters of `module` into units: (unit name, unit module, parameter names).

    Units come in the order given, then "root" (the module itself) with every trainable parameter no unit holds. A
    parameter held by two units (a tied weight) belongs to the first; units with no trainable parameter are left out.

    Raises:
        ValueError: a unit that is not a submodule of `module`.
    """
    unit_names = {id(sub): name for name, sub in module.named_modules()}
    claimed: set[int] = set()
    partition = []
    for unit in [*units, module]:
        if id(unit) not in unit_names:
            raise ValueError(f"partition_parameters: unit {type(unit).__name__} is not a submodule of the model")
        prefix = unit_names[id(unit)]
        names = []
        for name, param in unit.named_parameters():  # named_parameters lists a tied weight once
            if param.requires_grad and id(param) not in claimed:
                claimed.add(id(param))
                names.append(f"{prefix}.{name}" if prefix else name)
        if names:
            partition.append((prefix or "root", unit, names))
    return partition


@torch.no_grad()
def shard_module(module: nn.Module, units: Sequence[nn.Module], *, group: dist.ProcessGroup | None,
                 param_dtype: torch.dtype | None) -> tuple[list[FlatGroup], list[torch.Tensor]]:
    """Turn the trainable parameters of `module` into views of one flat buffer per unit, the same on every rank.

    For each unit: flatten its parameters (their own dtype, the master precision), broadcast the buffer from the
    group's rank 0, cut this rank's master shard out of it, cast the buffer to `param_dtype` and point every
    parameter's `.data` at its view. Frozen parameters are broadcast too and cast to `param_dtype`, but not sharded.

    Args:
        module: the model, on this rank's device; the same structure on every rank.
        units: submodules that form units (e.g. the transformer blocks); the rest forms "root".
        group: the data-parallel process group (None: the default group).
        param_dtype: the in-flight dtype of parameters and gradients (None: keep each parameter's own).

    Returns:
        (groups, masters): one FlatGroup per unit with `full` filled and `shard` a view of it, and for each group the
        (shard_numel,) master shard in the parameters' original dtype (a tensor of its own).
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    params = dict(module.named_parameters())
    for param in params.values():
        if not param.requires_grad:  # replicated, never sharded: rank 0's values, in the in-flight dtype
            dist.broadcast(param.data, group=group, group_src=0)
            if param_dtype is not None:
                param.data = param.data.to(param_dtype)
    groups, masters = [], []
    for name, unit, names in partition_parameters(module, units):
        members = [params[n] for n in names]
        layout = FlatLayout.of([p.shape for p in members], world_size=world_size)
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: shard_module is not implemented yet (lab05_zero/flat.py)")
    return groups, masters


# -----------------------------------------------------------------------------
# Collectives on flat buffers (torch 2.13 renamed them *_single; the GPU image has 2.11, with the old names)


def all_gather_flat(full: torch.Tensor, shard: torch.Tensor, *, group: dist.ProcessGroup | None,
                    async_op: bool = False):
    """full (N * S,) <- the shards (S,) of every rank, in rank order. Returns a Work handle when async_op."""
    if hasattr(dist, "all_gather_single"):
        return dist.all_gather_single(full, shard, group=group, async_op=async_op)
    return dist.all_gather_into_tensor(full, shard, group=group, async_op=async_op)


def reduce_scatter_flat(shard: torch.Tensor, full: torch.Tensor, *, group: dist.ProcessGroup | None,
                        async_op: bool = False):
    """shard (S,) <- this rank's slice of the sum over ranks of full (N * S,). Returns a Work handle when async_op."""
    if hasattr(dist, "reduce_scatter_single"):
        return dist.reduce_scatter_single(shard, full, group=group, async_op=async_op)
    return dist.reduce_scatter_tensor(shard, full, group=group, async_op=async_op)
