"""Sharding a full checkpoint for tensor parallelism, deterministically, and the tensor-parallel model built from it.

What it saves: each rank loads only its 1/t of every split matrix (the norms, a few C-sized vectors, are replicated),
and the sharded model computes exactly what the unsharded one does: the same loss, and gradients that concatenate
back into the full model's gradients.

The rule for each parameter of common.model.Transformer (Megatron-LM, Shoeybi et al. 2019, arXiv:1909.08053,
Section 3), for rank r of t, with shard_along(w, dim, index=r, num_shards=t) taking slice r of t along dim:

    embed.weight, lm_head.weight (V, C)             dim 0, vocabulary rows        (vocab_parallel.py)
    q_proj, gate_proj, up_proj (F or C, C)          dim 0, output features        (column-parallel)
    k_proj, v_proj (H_kv D, C)                      dim 0 when t divides H_kv; otherwise the rows of head
                                                    r // (t / H_kv), copied on t / H_kv ranks
    out_proj, down_proj (C, C or F)                 dim 1, input features         (row-parallel)
    attn_norm, mlp_norm, norm (C,)                  replicated

The rule depends only on the name, the shape and (r, t): every run, every rank, every restart shards the same way,
so a checkpoint saved from one tensor-parallel size can be re-sharded to another.

Usage:
    tp_model = apply_tensor_parallel(model, tp_group=mesh.tp_group, config=TensorParallelConfig())
    loss = tp_model.loss(tokens, targets)                  # equals model.loss(tokens, targets)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from common.mesh import shard_along
from common.model import ModelConfig, RMSNorm, Transformer, rope_tables, sdpa_attention

from .sequence_parallel import (SequenceParallelBlock, SequenceParallelRMSNorm, check_sequence_length, gather_from_sp,
                                reduce_scatter_to_sp)
from .tensor_parallel import ColumnParallelLinear, ParallelBlock, kv_head_layout
from .vocab_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy

COLUMN_PARALLEL = ("q_proj.weight", "gate_proj.weight", "up_proj.weight")
ROW_PARALLEL = ("out_proj.weight", "down_proj.weight")
VOCAB_PARALLEL = ("embed.weight", "lm_head.weight")
KV_PROJECTIONS = ("k_proj.weight", "v_proj.weight")
REPLICATED = ("norm.weight",)  # attn_norm, mlp_norm and the final norm all end with it

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class TensorParallelConfig:
    """sequence_parallel: split norms and residuals along the sequence too (sequence_parallel.py)."""

    sequence_parallel: bool = False


# -----------------------------------------------------------------------------
# Sharding a checkpoint


def shard_parameter(name: str, tensor: torch.Tensor, *, config: ModelConfig, tp_rank: int,
                    tp_size: int) -> torch.Tensor:
    """Rank `tp_rank`'s shard of the full parameter `name` (a name of common.model.Transformer), a new tensor.

    Raises:
        ValueError: a name the rule does not know, or a size tp_size does not divide (naming both numbers).
    """
    # BEGIN SOLUTION
    if name.endswith(VOCAB_PARALLEL) or name.endswith(COLUMN_PARALLEL):
        return shard_along(tensor, 0, index=tp_rank, num_shards=tp_size, what=name)
    if name.endswith(ROW_PARALLEL):
        return shard_along(tensor, 1, index=tp_rank, num_shards=tp_size, what=name)
    if name.endswith(KV_PROJECTIONS):
        _, ranks_per_head = kv_head_layout(config.num_heads, config.num_kv_heads, tp_size)
        if ranks_per_head == 1:
            return shard_along(tensor, 0, index=tp_rank, num_shards=tp_size, what=name)
        # a copy of one whole head: its D rows
        return shard_along(tensor, 0, index=tp_rank // ranks_per_head, num_shards=config.num_kv_heads, what=name)
    if name.endswith(REPLICATED):
        return tensor.detach().clone()
    raise ValueError(f"shard_parameter: no sharding rule for parameter {name!r}")
    # END SOLUTION


def shard_checkpoint(state_dict: dict[str, torch.Tensor], *, config: ModelConfig, tp_rank: int,
                     tp_size: int) -> dict[str, torch.Tensor]:
    """The state dict of rank `tp_rank`'s TensorParallelTransformer, from a full Transformer's state dict.

    Names are unchanged; every tensor is a new one (the full checkpoint is not modified or aliased).
    """
    return {name: shard_parameter(name, tensor, config=config, tp_rank=tp_rank, tp_size=tp_size)
            for name, tensor in state_dict.items()}


# -----------------------------------------------------------------------------
# The tensor-parallel model


class TensorParallelTransformer(nn.Module):
    """common.model.Transformer with every layer tensor-parallel, and the same parameter names.

    forward(tokens) returns this rank's logits (B, N, V // t); loss(tokens, targets) the mean token NLL, computed by
    vocab_parallel_cross_entropy without gathering the logits. With sequence_parallel, the activations between the
    tensor-parallel regions are (B, N // t, C).
    """

    def __init__(self, config: ModelConfig, *, group: dist.ProcessGroup, parallel: TensorParallelConfig,
                 attention=sdpa_attention):
        super().__init__()
        self.config, self.group, self.sequence_parallel = config, group, parallel.sequence_parallel
        block = SequenceParallelBlock if self.sequence_parallel else ParallelBlock
        self.embed = VocabParallelEmbedding(config.vocab_size, config.width, group=group)
        self.blocks = nn.ModuleList(block(config, group=group, attention=attention) for _ in range(config.num_layers))
        self.norm = (SequenceParallelRMSNorm(config.width, config.norm_eps, group=group) if self.sequence_parallel
                     else RMSNorm(config.width, config.norm_eps))
        # with sequence parallelism the input is all-gathered along the sequence first, which plays f's part
        self.lm_head = ColumnParallelLinear(config.width, config.vocab_size, group=group,
                                            copy_input=not self.sequence_parallel)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight  # both (V // t, C), split the same way
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N) -> (B, N, C), or (B, N // t, C) with sequence parallelism."""
        # BEGIN SOLUTION
        if self.sequence_parallel:
            check_sequence_length(tokens.shape[1], dist.get_world_size(self.group))
            return reduce_scatter_to_sp(self.embed.local_lookup(tokens), self.group)
        return self.embed(tokens)
        # END SOLUTION

    def run_blocks(self, x: torch.Tensor, blocks=None) -> torch.Tensor:
        """Run `blocks` (default: all) on x; RoPE tables cover the full sequence even when x holds N // t positions."""
        N = x.shape[1] * (dist.get_world_size(self.group) if self.sequence_parallel else 1)
        for block in self.blocks if blocks is None else blocks:
            x = block(x, self.rope_cos[:N], self.rope_sin[:N])
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and the output layer: x from the last block -> this rank's logits (B, N, V // t)."""
        # BEGIN SOLUTION
        x = self.norm(x)
        if self.sequence_parallel:
            x = gather_from_sp(x, self.group)  # (B, N, C)
        return self.lm_head(x)
        # END SOLUTION

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_blocks(self.embed_tokens(tokens)))

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean NLL over the non-ignored targets, from this rank's logits (B, N, V // t) and targets (B, N)."""
        # BEGIN SOLUTION
        losses = vocab_parallel_cross_entropy(logits.flatten(0, 1), targets.flatten(), group=self.group)
        return losses.sum() / (targets != -100).sum()  # nan when every target is ignored, as F.cross_entropy
        # END SOLUTION

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_from_logits(self.forward(tokens), targets)


def apply_tensor_parallel(model: Transformer, *, tp_group: dist.ProcessGroup,
                          config: TensorParallelConfig = TensorParallelConfig()) -> TensorParallelTransformer:
    """A TensorParallelTransformer holding this rank's shard of `model` (same dtype and device; model is unchanged).

    Every rank of tp_group must pass the same full model (e.g. built from the same seed, or loaded from one file).

    Raises:
        ValueError: the group size does not divide the heads, the FFN width or the vocabulary (naming both numbers).
    """
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    attention = model.blocks[0].attn.attention if len(model.blocks) else sdpa_attention
    parallel = TensorParallelTransformer(model.config, group=tp_group, parallel=config, attention=attention)
    reference = next(model.parameters())
    parallel.to(device=reference.device, dtype=reference.dtype)
    shards = shard_checkpoint(model.state_dict(), config=model.config, tp_rank=tp_rank, tp_size=tp_size)
    parallel.load_state_dict(shards, strict=True)
    return parallel
