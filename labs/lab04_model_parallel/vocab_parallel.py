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
    # TODO (lab04): your code here
    raise NotImplementedError("lab04: vocab_range is not implemented yet (lab04_model_parallel/vocab_parallel.py)")


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
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: VocabParallelEmbedding.forward is not implemented yet (lab04_model_parallel/vocab_parallel.py)")

    def local_lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's part before the reduction: rows of the tokens it owns, zeros for the others. (B, N, C)."""
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: VocabParallelEmbedding.local_lookup is not implemented yet (lab04_model_parallel/vocab_parallel.py)")


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
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: _VocabParallelCrossEntropy.forward is not implemented yet (lab04_model_parallel/vocab_parallel.py)")

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # TODO (lab04): your code here
        raise NotImplementedError("lab04: _VocabParallelCrossEntropy.backward is not implemented yet (lab04_model_parallel/vocab_parallel.py)")
