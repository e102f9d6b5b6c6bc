"""FlashAttention as a differentiable op, plugged into the kit's model and into a HF transformers Llama.

What it saves: autograd through `softmax(q k^T) v` keeps the (B, H, N, N) probabilities for the backward. This
`autograd.Function` saves only q, k, v, O and the logsumexp L (B, H, N): O(N) activation memory per layer, and the
backward recomputes P tile by tile (Dao 2023, "FlashAttention-2", arXiv:2307.08691, Algorithms 1 and 2).

    forward:   O, L = flash_attn_fwd(Q, K, V)                  save Q, K, V, O, L
    backward:  dQ, dK, dV = flash_attn_bwd(Q, K, V, O, L, dO)   D = rowsum(dO * O) inside

Two ways in:
- the kit's model: `model.set_attention(flash_attention)` (common.model calls attention(q, k, v, causal=True));
- HF transformers: `register_hf_attention()` adds "lab07_triton" to `AttentionInterface` (and its mask builder to
  `AttentionMaskInterface`), so `LlamaForCausalLM(config)` with `attn_implementation="lab07_triton"`, or
  `model.set_attn_implementation("lab07_triton")`, runs these kernels in every layer. HF hands the attention function
  un-repeated K/V heads, so GQA runs without copies.

Usage:
    o = flash_attention(q, k, v, causal=True)                      # q (B, H, N, D), k, v (B, H_kv, N, D)
    name = register_hf_attention()
    model = LlamaForCausalLM(LlamaConfig(..., attn_implementation=name))
"""

from __future__ import annotations

import torch

from .flash_bwd import flash_attn_bwd
from .flash_fwd import flash_attn_fwd

HF_ATTENTION_NAME = "lab07_triton"  # no "flash" in the name: HF would look for the flash-attn package

# -----------------------------------------------------------------------------
# Public entry points


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, sm_scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v with FlashAttention-2 kernels in forward and backward.

    Args:
        q: (B, H, Nq, D); k, v: (B, H_kv, Nk, D) with H_kv dividing H. fp16/bf16/fp32 on CUDA, fp32 on CPU.
        causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq).
        sm_scale: default 1 / sqrt(D).

    Returns:
        o: (B, H, Nq, D) in q's dtype; differentiable with respect to q, k and v.
    """
    return FlashAttentionFunction.apply(q, k, v, causal, sm_scale)


def hf_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The signature HF's `AttentionInterface` expects (like `sdpa_attention_forward`).

    Args:
        module: the calling attention layer (read for `is_causal`).
        query: (B, H, N, D); key, value: (B, H_kv, N_kv, D), K/V heads not repeated.
        attention_mask: None for unpadded causal batches (what our mask builder returns); a padding mask is refused.
        dropout: attention dropout probability; must be 0 (the kernels have no dropout).
        scaling: the softmax scale (HF passes head_dim ** -0.5).
        is_causal: overrides `module.is_causal` when given.
        **kwargs: other HF arguments (position ids, cache info), unused.

    Returns:
        (attn_output (B, N, H, D), None): HF reshapes it to (B, N, H * D); no attention weights are returned.

    Raises:
        ValueError: for a padding mask or nonzero dropout, which the kernels do not implement.
    """
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: hf_attention_forward is not implemented yet (lab07_flash_attention/attention.py)")


def register_hf_attention(name: str = HF_ATTENTION_NAME) -> str:
    """Register `hf_attention_forward` with HF transformers under `name` and return the name.

    The mask builder registered with it is HF's FlashAttention one: it returns None for unpadded causal batches (the
    kernels mask causally themselves) and a 2-D padding mask otherwise (which `hf_attention_forward` refuses).
    """
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: register_hf_attention is not implemented yet (lab07_flash_attention/attention.py)")


# -----------------------------------------------------------------------------
# The autograd.Function


class FlashAttentionFunction(torch.autograd.Function):
    """forward: the Triton forward, saving (q, k, v, O, L); backward: the Triton backward. No N x N tensor is saved."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                sm_scale: float | None) -> torch.Tensor:
        # TODO (lab07): your code here
        raise NotImplementedError("lab07: FlashAttentionFunction.forward is not implemented yet (lab07_flash_attention/attention.py)")

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # TODO (lab07): your code here
        raise NotImplementedError("lab07: FlashAttentionFunction.backward is not implemented yet (lab07_flash_attention/attention.py)")


# -----------------------------------------------------------------------------
# Helpers: a small HF Llama for tests, the notebook and the benchmark


def tiny_llama_config(**overrides):
    """A LlamaConfig small enough to train on a CPU through the Triton interpreter (GQA: 4 query, 2 K/V heads)."""
    from transformers import LlamaConfig

    settings = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)
