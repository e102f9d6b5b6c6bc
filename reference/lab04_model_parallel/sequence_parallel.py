"""Sequence parallelism: the parts of a block that tensor parallelism leaves replicated, split along the sequence.

What it saves: under tensor parallelism, the norms, the residual additions and the dropouts run on the full
(B, N, C) activation on every rank, so their activations are not divided by t. Sequence parallelism gives rank r the
positions [r N/t, (r+1) N/t) of those regions, dividing all of a block's activations by t, for the same traffic: an
all-reduce is a reduce-scatter followed by an all-gather, and the two halves now sit on either side of the regions.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198),
Section 4.2.2 and Figure 5. The conjugate pair f, g of tensor parallelism becomes g-bar, g:

    g-bar (entering a tensor-parallel region): all-gather along the sequence in forward, reduce-scatter in backward
    g     (leaving it):                        reduce-scatter along the sequence in forward, all-gather in backward

    x (B, N/t, C) -> RMSNorm -> g-bar -> (B, N, C) -> attention (heads split) -> partial sums (B, N, C) -> g ->
    (B, N/t, C) -> + x -> RMSNorm -> g-bar -> MLP (columns split) -> partial sums -> g -> (B, N/t, C) -> + ...

A norm's weight is now applied on N/t positions per rank, so each rank holds part of its gradient: the weight enters
through f (identity forward, all-reduce backward), which sums the parts.

Usage (tp_group from common.mesh.build_mesh(tp=...).tp_group):
    block = SequenceParallelBlock(config, group=tp_group)    # then load the rank's shard (sharding.py)
    x = block(x, cos, sin)                                  # x: (B, N // t, C), this rank's positions
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.model import ModelConfig, RMSNorm, sdpa_attention

from .tensor_parallel import ParallelAttention, ParallelSwiGLU, copy_to_tp

# -----------------------------------------------------------------------------
# The communication operators (along dim 1, the sequence)


class GatherFromSequenceParallel(torch.autograd.Function):
    """g-bar: forward all-gathers the ranks' (B, N/t, C) slices into (B, N, C); backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # BEGIN SOLUTION
        return _all_gather_sequence(x, group)
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # BEGIN SOLUTION
        return _reduce_scatter_sequence(grad, ctx.group), None
        # END SOLUTION


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """g: forward sums the ranks' (B, N, C) partial results and keeps this rank's (B, N/t, C); backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # BEGIN SOLUTION
        return _reduce_scatter_sequence(x, group)
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # BEGIN SOLUTION
        return _all_gather_sequence(grad, ctx.group), None
        # END SOLUTION


def gather_from_sp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return GatherFromSequenceParallel.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return ReduceScatterToSequenceParallel.apply(x, group)


def check_sequence_length(seq_len: int, tp_size: int) -> None:
    """Raise ValueError (naming both numbers) unless tp_size divides seq_len."""
    if seq_len % tp_size:
        raise ValueError(f"sequence parallelism: the sequence length ({seq_len}) must be divisible by the "
                         f"tensor-parallel size ({tp_size})")


# -----------------------------------------------------------------------------
# The block


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm over this rank's positions; the weight enters through f, so its gradient is summed over the group."""

    def __init__(self, width: int, eps: float, *, group: dist.ProcessGroup):
        super().__init__(width, eps)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        # BEGIN SOLUTION
        weight = copy_to_tp(self.weight, self.group).to(x32.dtype)
        # END SOLUTION
        return F.rms_norm(x32, (x.shape[-1],), weight, self.eps).to(x.dtype)


class SequenceParallelBlock(nn.Module):
    """common.model.Block with tensor-parallel attention and MLP, and sequence-parallel norms and residuals.

    Input and output: (B, N // t, C), this rank's positions. Parameter names: those of Block.
    """

    def __init__(self, config: ModelConfig, *, group: dist.ProcessGroup, attention=sdpa_attention):
        super().__init__()
        self.group = group
        self.attn_norm = SequenceParallelRMSNorm(config.width, config.norm_eps, group=group)
        self.attn = ParallelAttention(config, group=group, attention=attention)
        self.mlp_norm = SequenceParallelRMSNorm(config.width, config.norm_eps, group=group)
        self.mlp = ParallelSwiGLU(config, group=group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, N // t, C) -> (B, N // t, C); cos, sin cover the full sequence (attention sees all N positions)."""
        # BEGIN SOLUTION
        attended = self.attn.partial(gather_from_sp(self.attn_norm(x), self.group), cos, sin)  # (B, N, C) partial
        x = x + self.attn.dropout(reduce_scatter_to_sp(attended, self.group))  # (B, N // t, C)
        hidden = self.mlp.partial(gather_from_sp(self.mlp_norm(x), self.group))
        return x + self.mlp.dropout(reduce_scatter_to_sp(hidden, self.group))
        # END SOLUTION


# -----------------------------------------------------------------------------
# Helpers: all-gather and reduce-scatter along dim 1


def _all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, N/t, ...) on each rank -> (B, N, ...), slices in rank order."""
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=1)


def _reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, N, ...) partial sums on each rank -> (B, N/t, ...): rank r's positions, summed over the ranks."""
    size = dist.get_world_size(group)
    pieces = [piece.contiguous() for piece in x.chunk(size, dim=1)]
    out = torch.empty_like(pieces[0])
    dist.reduce_scatter(out, pieces, group=group)
    return out
