"""Vocabulary parallelism: the embedding table and the output layer split by vocabulary rows, and a cross-entropy
that never gathers the full logits.

What it saves: the embedding and the output layer hold V x C parameters each, often the largest matrices of a model
(GPT-2: 50304 x 768 = 39 M of 124 M). Split by vocabulary, each rank holds V/t rows. Gathering the logits, (B, N, V)
per step, would cost as much memory and traffic as the layer saves; the loss is computed from the shards instead.

Shoeybi et al. 2019, "Megatron-LM" (arXiv:1909.08053), Section 3 (input and output embeddings). Rank r owns token ids
[r V/t, (r+1) V/t). The embedding looks up the tokens it owns, writes zeros for the others, and all-reduces (g).
The cross-entropy of token n with target y_n, from the rank's logits z (N, V/t), takes three all-reduces of N numbers:

    m_n   = max_r max_j z_nj                      all-reduce MAX   (stability: exp never overflows)
    S_n   = sum_r sum_j exp(z_nj - m_n)           all-reduce SUM
    z_ny  = the target's logit, from its owner    all-reduce SUM   (the other ranks contribute 0)
    loss_n = log S_n - (z_ny - m_n)

and its backward needs no communication: dloss_n/dz_nj = softmax_nj - [j = y_n], each rank on its own columns.

Usage (tp_group from common.mesh.build_mesh(tp=...).tp_group):
    embed = VocabParallelEmbedding(V, C, group=tp_group)
    losses = vocab_parallel_cross_entropy(local_logits, targets, group=tp_group)   # (B * N,), no (B, N, V) anywhere
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .tensor_parallel import reduce_from_tp

IGNORE_INDEX = -100  # targets equal to this are padding: loss 0 and no gradient (as in F.cross_entropy)

# -----------------------------------------------------------------------------
# Plain-PyTorch version (one process, the whole vocabulary)


def cross_entropy_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What the vocab-parallel version computes: F.cross_entropy per token, 0 at ignored targets. logits (T, V)."""
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, targets,
                           ignore_index=IGNORE_INDEX, reduction="none")


# -----------------------------------------------------------------------------
# The embedding


def vocab_range(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Token ids [start, stop) owned by rank `tp_rank` of `tp_size`.

    Raises:
        ValueError: tp_size does not divide vocab_size (the message names both).
    """
    # BEGIN SOLUTION
    if vocab_size % tp_size:
        raise ValueError(f"vocab_size ({vocab_size}) must be divisible by the tensor-parallel size ({tp_size})")
    per_rank = vocab_size // tp_size
    return tp_rank * per_rank, (tp_rank + 1) * per_rank
    # END SOLUTION


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding(num_embeddings, embedding_dim) with rows split across the group: weight (V // t, C) per rank.

    Raises:
        ValueError: t does not divide num_embeddings (from vocab_range).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.start, self.stop = vocab_range(num_embeddings, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, embedding_dim))  # (V // t, C)
        nn.init.normal_(self.weight, std=0.02)  # overwritten when a checkpoint's shard is loaded

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N) int64, the same on every rank -> (B, N, C), the same on every rank."""
        # BEGIN SOLUTION
        return reduce_from_tp(self.local_lookup(tokens), self.group)
        # END SOLUTION

    def local_lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's part before the reduction: rows of the tokens it owns, zeros for the others. (B, N, C)."""
        # BEGIN SOLUTION
        foreign = (tokens < self.start) | (tokens >= self.stop)
        local = (tokens - self.start).masked_fill(foreign, 0)  # any valid row; zeroed below
        return F.embedding(local, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)
        # END SOLUTION


# -----------------------------------------------------------------------------
# The cross-entropy


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """Per-token cross-entropy from vocabulary-split logits, with three all-reduces of T numbers each.

    Args:
        logits: (T, V // t), this rank's columns [r V/t, (r+1) V/t) of the logits (any float dtype; computed in at
            least fp32).
        targets: (T,) int64 in [0, V), or IGNORE_INDEX; the same on every rank.
        group: the tensor-parallel group.

    Returns:
        (T,) losses in at least fp32, the same on every rank, 0 where the target is ignored. Their mean over the
        non-ignored tokens is F.cross_entropy's.

    Raises:
        ValueError: logits not 2-D, or targets not (T,) (the message names the shapes).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"vocab_parallel_cross_entropy: logits must be (T, V // t) and targets (T,), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, targets, group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        tp_rank, tp_size = dist.get_rank(group), dist.get_world_size(group)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (T, V // t)
        # BEGIN SOLUTION
        start, stop = vocab_range(logits.shape[1] * tp_size, tp_rank, tp_size)
        # 1. the global max of each row (exp never overflows, and it cancels out of the loss)
        row_max = logits.max(dim=1).values  # (T,)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(1)
        # 2. the global sum of exponentials
        exp = shifted.exp()
        sum_exp = exp.sum(dim=1)  # (T,)
        dist.all_reduce(sum_exp, group=group)
        # 3. the target's shifted logit, contributed by the rank that owns it
        ignored = targets == IGNORE_INDEX
        owned = (targets >= start) & (targets < stop) & ~ignored
        local_target = (targets - start).masked_fill(~owned, 0)
        target_logit = shifted.gather(1, local_target.unsqueeze(1)).squeeze(1).masked_fill(~owned, 0.0)  # (T,)
        dist.all_reduce(target_logit, group=group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(1), local_target, owned, ignored)
        return loss
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # BEGIN SOLUTION
        softmax, local_target, owned, ignored = ctx.saved_tensors
        grad = softmax.clone()  # (T, V // t): d loss_n / d z_nj = softmax_nj - [j = y_n]
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows[owned], local_target[owned]] -= 1.0
        grad *= grad_loss.masked_fill(ignored, 0.0).unsqueeze(1)
        return grad, None, None
        # END SOLUTION
