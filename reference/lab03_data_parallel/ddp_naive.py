"""Naive data parallelism: one replica per rank, gradients averaged with one all-reduce per parameter after backward.

What it saves: time. p ranks each run forward and backward on B/p of the global batch, so a step takes ~1/p of the
compute, and after the all-reduce every replica holds the gradient of the whole batch. Memory is not saved: every rank
keeps the full model, gradients and optimizer state (ZeRO, lab 05, removes that redundancy).

Why averaging is exact. With the token-mean loss and equal local batches of B/p sequences of N tokens each,

    L(θ) = 1/p · Σ_r L_r(θ)      so      ∇L = 1/p · Σ_r ∇L_r      = all_reduce(∇L_r, sum) / p

and since every replica starts from the same θ (rank 0's, broadcast at construction) and applies the same averaged
gradient with the same optimizer, the replicas stay identical step after step: the run equals single-process training
on the concatenated batch (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", arXiv:2006.15704, Section 2).

Where each check is made (and why there):
- `shard_batch`: the global batch must divide by the world size, otherwise the mean of the local means is not the
  global mean. Every rank sees the same global batch, so every rank raises the same error with no communication.
- `NaiveDDP.__init__`: the parameters must have the same names, shapes, dtypes and requires_grad on every rank before
  rank 0's values are broadcast. The check is collective (`all_gather_object`), so *every* rank raises, rather than
  one rank raising while the others hang in the broadcast. Different *values* are not an error: replicas seeded
  differently are the common case, and the broadcast is what fixes them.

A parameter that received no gradient on a rank (unused in its forward) contributes zeros, so every trainable
parameter has a `.grad` after `sync_gradients` (plain SGD then leaves an unused parameter unchanged).

Usage:
    model = apply_naive_ddp(Transformer(config), group=group)
    tokens, targets = shard_batch(global_tokens, global_targets, rank=rank, world_size=world_size)
    model.module.loss(tokens, targets).backward()
    model.sync_gradients()
    optimizer.step()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

# -----------------------------------------------------------------------------
# Public entry points


def shard_batch(
    tokens: torch.Tensor, targets: torch.Tensor, *, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the global batch: rows [r·B/p, (r+1)·B/p).

    Args:
        tokens: (B, N) int64, the global batch, the same on every rank.
        targets: (B, N) int64.
        rank: r, 0 <= r < p.
        world_size: p.

    Returns:
        (tokens, targets), each (B/p, N).

    Raises:
        ValueError: B not divisible by p, mismatched shapes, or a rank out of range.
    """
    # BEGIN SOLUTION
    if tokens.shape != targets.shape or tokens.dim() != 2:
        raise ValueError(f"shard_batch: tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} must be (B, N)")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_batch: rank ({rank}) must be in [0, world_size ({world_size}))")
    batch_size = tokens.shape[0]
    if batch_size % world_size:
        raise ValueError(
            f"shard_batch: the global batch size ({batch_size}) must be divisible by the world size ({world_size}), "
            "or the average of the local mean losses is not the global mean"
        )
    local = batch_size // world_size
    rows = slice(rank * local, (rank + 1) * local)
    return tokens[rows], targets[rows]
    # END SOLUTION


class NaiveDDP(nn.Module):
    """Wrap a module for data parallelism: equal replicas at construction, averaged gradients on `sync_gradients()`.

    Args:
        module: the replica on this rank (already on this rank's device).
        group: the data-parallel process group (None: the default group).

    Raises:
        ValueError: on every rank, when parameter names, shapes, dtypes or requires_grad differ across ranks.
    """

    def __init__(self, module: nn.Module, *, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.module = module
        self.group = group
        # BEGIN SOLUTION
        check_same_structure(module, group=group)
        broadcast_parameters(module, group=group)
        # END SOLUTION

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Replace every trainable parameter's .grad by its average over ranks (a missing .grad counts as zeros)."""
        # BEGIN SOLUTION
        world_size = dist.get_world_size(self.group)
        for param in self.module.parameters():  # parameters() yields a tied weight once
            if not param.requires_grad:
                continue  # frozen on every rank (checked at construction), so no rank waits for it
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=self.group)  # one collective per parameter: latency-bound
            param.grad.div_(world_size)
        # END SOLUTION


def apply_naive_ddp(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> NaiveDDP:
    """The lab's `apply_<technique>` entry point: `NaiveDDP(model, group=group)`."""
    return NaiveDDP(model, group=group)


# -----------------------------------------------------------------------------
# Helpers shared with ddp_bucketed.py


def check_same_structure(module: nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Raise ValueError on every rank unless all ranks hold parameters of the same names, shapes, dtypes, requires_grad."""
    # BEGIN SOLUTION
    mine = [(name, tuple(p.shape), str(p.dtype), p.requires_grad) for name, p in module.named_parameters()]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)  # collective: every rank sees every signature
    for rank, theirs in enumerate(everyone):
        if theirs == everyone[0]:
            continue
        if len(theirs) != len(everyone[0]):
            detail = f"rank {rank} has {len(theirs)} parameters, rank 0 has {len(everyone[0])}"
        else:
            ours, other = next((a, b) for a, b in zip(everyone[0], theirs) if a != b)
            detail = f"rank {rank} has {other}, rank 0 has {ours} (name, shape, dtype, requires_grad)"
        raise ValueError(f"parameters differ across ranks before the broadcast: {detail}")
    # END SOLUTION


@torch.no_grad()
def broadcast_parameters(module: nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite every parameter and buffer with group rank 0's values."""
    # BEGIN SOLUTION
    source = 0 if group is None else dist.get_global_rank(group, 0)  # broadcast's src is a global rank
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=source, group=group)
    # END SOLUTION
