"""Megatron-LM tensor parallelism: each linear layer's weight split across the ranks of a tensor-parallel group.

What it saves: a block's weights, its optimizer state and most of its activations are divided by the group size t, at
the price of two all-reduces of the activations per block in forward and two in backward.

Shoeybi et al. 2019, "Megatron-LM" (arXiv:1909.08053), Section 3. An MLP Y = B(act(A X)) is split as

    A = [A_1, ..., A_t]   by columns (output features): rank i computes act(A_i X) alone, no communication
    B = [B_1; ...; B_t]   by rows (input features):     rank i computes B_i act(A_i X), a partial sum
    Y = g(sum_i B_i act(A_i f(X)))

with two conjugate operators (the paper's Figure 3):

    f: identity in forward, all-reduce (sum) of the gradient in backward   (enters the parallel region)
    g: all-reduce (sum) in forward, identity in backward                   (leaves it)

so an MLP or an attention layer costs one all-reduce in forward (g) and one in backward (f). Attention splits by heads:
rank i owns query heads [i H/t, (i+1) H/t) and the columns of q/k/v_proj (rows of out_proj) that belong to them. With
grouped-query attention, the K/V heads are split the same way when t divides H_kv; when H_kv < t, each rank keeps
a copy of the one K/V head its query heads read, and the copies' gradients are summed across the group.

Usage (inside a process group; tp_group from common.mesh.build_mesh(tp=...).tp_group):
    mlp = ParallelSwiGLU(config, group=tp_group)      # then load the rank's shard (sharding.py)
    y = mlp(x)                                        # x, y: (B, N, C), the same on every rank of the group
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.model import ModelConfig, RMSNorm, apply_rope, sdpa_attention

# -----------------------------------------------------------------------------
# The conjugate operators f and g (and the all-gather that ends a column-parallel layer)


class CopyToTensorParallel(torch.autograd.Function):
    """f: forward returns x unchanged; backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: CopyToTensorParallel.forward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: CopyToTensorParallel.backward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: forward all-reduces (sums) the rank's partial result over the group; backward passes the gradient on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ReduceFromTensorParallel.forward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ReduceFromTensorParallel.backward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


class GatherFromTensorParallel(torch.autograd.Function):
    """Forward: all-gather the ranks' slices along the last dim; backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: GatherFromTensorParallel.forward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: GatherFromTensorParallel.backward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The f operator (see CopyToTensorParallel)."""
    return CopyToTensorParallel.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The g operator (see ReduceFromTensorParallel)."""
    return ReduceFromTensorParallel.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather along the last dim, with the matching backward (see GatherFromTensorParallel)."""
    return GatherFromTensorParallel.apply(x, group)


# -----------------------------------------------------------------------------
# Column- and row-parallel linear layers


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A (out_features, in_features) split by rows of A (output features) across the group.

    The rank holds weight (out_features // t, in_features) and bias (out_features // t,): rows [r F/t, (r+1) F/t).

    Args:
        in_features, out_features: the full layer's sizes.
        group: the tensor-parallel process group (size t).
        gather_output: all-gather the output to (..., out_features) on every rank; otherwise each rank returns its
            (..., out_features // t) slice, ready for a RowParallelLinear.
        copy_input: apply f to the input. False when the caller applied f once for several layers sharing one input
            (q/k/v, gate/up), so that backward all-reduces the input's gradient once, not once per layer.
        bias: whether the layer has a bias.

    Raises:
        ValueError: t does not divide out_features (the message names both).
    """

    def __init__(self, in_features: int, out_features: int, *, group: dist.ProcessGroup, gather_output: bool = False,
                 copy_input: bool = True, bias: bool = False):
        super().__init__()
        self.group, self.gather_output, self.copy_input = group, gather_output, copy_input
        tp_size = dist.get_world_size(group)
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ColumnParallelLinear.__init__ is not implemented yet (lab04_model_parallel/tensor_parallel.py)")
        self.weight = nn.Parameter(torch.empty(local_out, in_features))  # (F // t, C)
        self.bias = nn.Parameter(torch.zeros(local_out)) if bias else None
        nn.init.normal_(self.weight, std=0.02)  # overwritten when a checkpoint's shard is loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features), the same on every rank -> (..., out_features // t), or (..., out_features) gathered."""
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ColumnParallelLinear.forward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


class RowParallelLinear(nn.Module):
    """y = x B^T + b with B (out_features, in_features) split by columns of B (input features) across the group.

    The input is already split: rank r gets features [r K/t, (r+1) K/t), as a ColumnParallelLinear returns them. The
    rank holds weight (out_features, in_features // t), those columns of B, and the whole bias, which is added once,
    after the all-reduce (adding it on every rank would count it t times).

    Args:
        in_features, out_features: the full layer's sizes.
        group: the tensor-parallel process group (size t).
        bias: whether the layer has a bias.

    Raises:
        ValueError: t does not divide in_features (the message names both).
    """

    def __init__(self, in_features: int, out_features: int, *, group: dist.ProcessGroup, bias: bool = False):
        super().__init__()
        self.group = group
        tp_size = dist.get_world_size(group)
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: RowParallelLinear.__init__ is not implemented yet (lab04_model_parallel/tensor_parallel.py)")
        self.weight = nn.Parameter(torch.empty(out_features, local_in))  # (C, F // t)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum x_r B_r^T, (..., out_features), before any reduction and without the bias.

        Sequence parallelism reduce-scatters these partial sums instead of all-reducing them.
        """
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: RowParallelLinear.partial is not implemented yet (lab04_model_parallel/tensor_parallel.py)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features // t), this rank's slice (a ColumnParallelLinear's output) -> (..., out_features)."""
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: RowParallelLinear.forward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


# -----------------------------------------------------------------------------
# The parallel SwiGLU MLP and the parallel attention


class ParallelSwiGLU(nn.Module):
    """W_down (silu(W_gate x) * W_up x) with W_gate, W_up column-parallel and W_down row-parallel.

    One all-reduce in forward (g, after W_down) and one in backward (f, before W_gate and W_up): the elementwise
    product needs no communication, because rank r holds the same F/t hidden features of both gate and up.

    Raises:
        ValueError: t does not divide the FFN width F (the message names both).
    """

    def __init__(self, config: ModelConfig, *, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        C, F_width = config.width, config.hidden_width
        self.gate_proj = ColumnParallelLinear(C, F_width, group=group, copy_input=False)
        self.up_proj = ColumnParallelLinear(C, F_width, group=group, copy_input=False)
        self.down_proj = RowParallelLinear(F_width, C, group=group)
        self.dropout = nn.Dropout(config.dropout)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the MLP output, (B, N, C), from an input on which f was already applied."""
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ParallelSwiGLU.partial is not implemented yet (lab04_model_parallel/tensor_parallel.py)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) the same on every rank -> (B, N, C) the same on every rank."""
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ParallelSwiGLU.forward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


class ReplicatedHeadGrad(torch.autograd.Function):
    """For a K/V projection copied on several ranks (H_kv < t): identity in forward; in backward, the sum of the
    gradients of every copy of the same head, so that all copies stay equal after an optimizer step.

    Each rank puts its gradient into slot `head` of a (H_kv, ...) buffer of zeros; one all-reduce over the group sums
    the copies of each head in its slot, and the rank keeps its own slot.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group: dist.ProcessGroup, head: int, num_heads: int) -> torch.Tensor:
        ctx.group, ctx.head, ctx.num_heads = group, head, num_heads
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ReplicatedHeadGrad.backward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


def kv_head_layout(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(K/V heads per rank, ranks per K/V head) for H query heads and H_kv K/V heads over t ranks.

    t divides H_kv: each rank owns H_kv / t heads, one rank per head -> (H_kv // t, 1).
    H_kv divides t: each rank keeps a copy of one head, t / H_kv ranks share it -> (1, t // H_kv).

    Raises:
        ValueError: t does not divide H, or neither of t and H_kv divides the other (the message names the numbers).
    """
    # TODO (lab04): your code here
    raise NotImplementedError("lab04: kv_head_layout is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


class ParallelAttention(nn.Module):
    """Causal self-attention with RoPE and GQA, heads split across the group (Megatron-LM, Section 3, Figure 3b).

    Rank r owns query heads [r H/t, (r+1) H/t): rows of q_proj, columns of out_proj (row-parallel). K/V: see
    `kv_head_layout`; with copies, rank r keeps head r // (t / H_kv), rows [h D, (h+1) D) of k_proj and v_proj.
    Parameter names are those of common.model.Attention, so a full checkpoint's shard loads by name.

    Raises:
        ValueError: from kv_head_layout (t does not divide H; H_kv and t do not divide one another).
    """

    def __init__(self, config: ModelConfig, *, group: dist.ProcessGroup, attention=sdpa_attention):
        super().__init__()
        self.group, self.attention = group, attention
        tp_size, tp_rank = dist.get_world_size(group), dist.get_rank(group)
        C, D = config.width, config.head_dim
        kv_per_rank, ranks_per_kv = kv_head_layout(config.num_heads, config.num_kv_heads, tp_size)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads // tp_size, kv_per_rank, D
        self.kv_copies = ranks_per_kv > 1
        self.kv_head = tp_rank // ranks_per_kv  # the head this rank's copy holds (used when kv_copies)
        self.total_kv_heads = config.num_kv_heads
        self.q_proj = ColumnParallelLinear(C, C, group=group, copy_input=False)
        if self.kv_copies:  # a whole head per rank: plain linears, their gradients summed by ReplicatedHeadGrad
            self.k_proj = nn.Linear(C, D, bias=False)
            self.v_proj = nn.Linear(C, D, bias=False)
        else:
            self.k_proj = ColumnParallelLinear(C, config.num_kv_heads * D, group=group, copy_input=False)
            self.v_proj = ColumnParallelLinear(C, config.num_kv_heads * D, group=group, copy_input=False)
        self.out_proj = RowParallelLinear(C, C, group=group)
        self.dropout = nn.Dropout(config.dropout)

    def partial(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the attention output, (B, N, C), from an input on which f was applied."""
        B, N, _ = x.shape
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ParallelAttention.partial is not implemented yet (lab04_model_parallel/tensor_parallel.py)")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) the same on every rank -> (B, N, C) the same on every rank."""
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: ParallelAttention.forward is not implemented yet (lab04_model_parallel/tensor_parallel.py)")


class ParallelBlock(nn.Module):
    """common.model.Block with ParallelAttention and ParallelSwiGLU; the norms are replicated on every rank.

    Two all-reduces in forward and two in backward. Signature and parameter names: those of Block.
    """

    def __init__(self, config: ModelConfig, *, group: dist.ProcessGroup, attention=sdpa_attention):
        super().__init__()
        self.attn_norm = RMSNorm(config.width, config.norm_eps)
        self.attn = ParallelAttention(config, group=group, attention=attention)
        self.mlp_norm = RMSNorm(config.width, config.norm_eps)
        self.mlp = ParallelSwiGLU(config, group=group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))
