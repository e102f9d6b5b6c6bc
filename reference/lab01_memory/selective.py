"""Selective activation recomputation: keep what is expensive to recompute, recompute what is cheap but large.

What it saves: full checkpointing (plans.py) stores only each segment's input but recomputes the whole forward, about
a third more compute. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198, Section 4.2) observe that a transformer layer's activations fall into two kinds:

    expensive to recompute, cheap to keep:   the outputs of the linear layers (the GEMMs: q, k, v, the MLP's gate
                                             and up projections), and the inputs the GEMMs' weight gradients need
    cheap to recompute, expensive to keep:   the attention core softmax(QK^T/sqrt(D))V with its N^2 scores and
                                             RoPE's fp32 copies, the norms' fp32 intermediates, the SwiGLU activation

and checkpoint only the second kind. Per layer (their Eq. 2 and 3, in bytes, for width C, H heads, sequence N, batch
B, fp16 activations) the attention's 5·H·N²·B term disappears at a recompute cost of a few percent of the FLOPs:

    full:       N·B·C·(34 + 5·H·N/C)        selective:  N·B·C·34        full recompute:  2·N·B·C (the layer input)

Here, for the kit's Llama-style block (`common.model.Block`), three regions run under `checkpoint` (part 1 of this
lab), each keeping only its inputs and recomputing its insides in backward:

    norms       RMSNorm: keeps its input x, recomputes the fp32 x32, rsqrt and normalised copies
    attention   RoPE + attention core: keeps q, k, v (projection outputs), recomputes the rotation and the scores
    activation  silu(gate) * up: keeps gate and up (projection outputs), recomputes silu(gate)

and one more outside the blocks, which the paper's per-layer count leaves out but a byte-level vocabulary of 50k makes
the largest of all: the loss. Its fp32 log-softmax over the vocabulary (B·N·V·4 bytes, 1.6 GB for GPT-2 at B8 N1024)
costs one pass over memory to recompute from the kept logits:

    loss        cross-entropy: keeps the logits (the lm_head's output), recomputes the fp32 log-softmax

Every linear layer runs exactly once; the dropout masks stay outside the regions (no RNG to replay).

Usage:
    model = apply_selective_recomputation(model, config=SelectiveConfig())
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.model import Block, Transformer, apply_rope, token_cross_entropy

from .checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class SelectiveConfig:
    """Which cheap regions of each block to recompute in backward (all three by default)."""

    norms: bool = True
    attention: bool = True
    activation: bool = True
    loss: bool = True

    def __post_init__(self) -> None:
        """Raises TypeError naming the field when a field is not a bool (1 or "yes" would silently pass)."""
        # BEGIN SOLUTION
        for name in ("norms", "attention", "activation", "loss"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SelectiveConfig.{name} must be a bool, got {getattr(self, name)!r}")
        # END SOLUTION


# -----------------------------------------------------------------------------
# Public entry point


def apply_selective_recomputation(model: Transformer, *, config: SelectiveConfig) -> Transformer:
    """Install a block runner that runs every block with `selective_block` and, with `config.loss`, a loss that
    recomputes its log-softmax; parameters are unchanged."""
    model.block_runner = SelectiveRunner(config)
    if config.loss:
        model.loss_fn = recomputed_loss
    return model


def recomputed_loss(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """token_cross_entropy under `checkpoint`: keeps the logits and targets, recomputes the fp32 log-softmax."""
    # BEGIN SOLUTION
    return checkpoint(_cross_entropy, logits, targets, reduction)
    # END SOLUTION


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """token_cross_entropy with the reduction as a positional argument (checkpoint passes arguments positionally)."""
    return token_cross_entropy(logits, targets, reduction=reduction)


class SelectiveRunner:
    """Runs the blocks in order, each through `selective_block` with the config's regions recomputed."""

    def __init__(self, config: SelectiveConfig):
        self.config = config

    def __call__(self, blocks: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = selective_block(block, x, cos, sin, self.config)
        return x


# -----------------------------------------------------------------------------
# One block, region by region


def selective_block(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    config: SelectiveConfig) -> torch.Tensor:
    """The same computation as `block(x, cos, sin)`, with the config's cheap regions under `checkpoint`.

    Args:
        block: a `common.model.Block` (attn_norm, attn, mlp_norm, mlp).
        x: (B, N, C) the block's input.
        cos, sin: (N, D/2) RoPE tables.
        config: which regions to recompute.

    Returns:
        (B, N, C), equal to `block(x, cos, sin)`.
    """
    attn, mlp = block.attn, block.mlp
    B, N, C = x.shape

    # BEGIN SOLUTION
    # attention sub-layer: x + dropout(out_proj(attention(rope(q), rope(k), v)))
    h = _maybe_checkpoint(block.attn_norm, x, enabled=config.norms)  # (B, N, C)
    q = attn.q_proj(h).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, N, D), kept
    k = attn.k_proj(h).view(B, N, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # (B, H_kv, N, D), kept
    v = attn.v_proj(h).view(B, N, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # (B, H_kv, N, D), kept
    core = _AttentionCore(attn.attention)
    o = _maybe_checkpoint(core, q, k, v, cos[:N], sin[:N], enabled=config.attention)  # (B, H, N, D)
    x = x + attn.dropout(attn.out_proj(o.transpose(1, 2).reshape(B, N, C)))

    # MLP sub-layer: x + dropout(down_proj(silu(gate_proj(h)) * up_proj(h)))
    h = _maybe_checkpoint(block.mlp_norm, x, enabled=config.norms)  # (B, N, C)
    gate, up = mlp.gate_proj(h), mlp.up_proj(h)  # (B, N, F) each, kept
    product = _maybe_checkpoint(_swiglu, gate, up, enabled=config.activation)  # (B, N, F)
    return x + mlp.dropout(mlp.down_proj(product))
    # END SOLUTION


def _maybe_checkpoint(function, *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """`checkpoint(function, *args)` when enabled, else a plain call."""
    return checkpoint(function, *args) if enabled else function(*args)


class _AttentionCore:
    """RoPE on q and k, then the attention kernel: the cheap, N^2-sized part of the attention sub-layer."""

    def __init__(self, attention):
        self.attention = attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.attention(q, k, v, causal=True)  # (B, H, N, D)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the SwiGLU activation between the MLP's projections."""
    return F.silu(gate) * up
