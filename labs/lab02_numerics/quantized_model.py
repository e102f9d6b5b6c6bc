"""Quantizing a whole model: every nn.Linear becomes a QuantizedLinear, and perplexity says what it cost.

What it saves: weight bytes. The kit's Transformer keeps almost all its parameters in nn.Linear layers (q/k/v/out
projections, the SwiGLU MLP, the LM head); the embedding and the RMSNorm gains stay in their original dtype.
Weight-only quantization (as in LLM.int8(), arXiv:2208.07339; GPTQ, arXiv:2210.17323; QLoRA, arXiv:2305.14314)
stores W in a few bits and dequantizes it on the fly, y = x W'^T + b with W' = deq(q(W)); activations keep their dtype.

Perplexity (the exponential of the mean next-token NLL on held-out text) measures the damage:

    PPL = exp( - 1/T sum_t log p(x_t | x_<t) )

Schemes (bits per weight, with fp32 scales):
    int8_tensor    8 + 32 / (N K)         absmax over the whole matrix
    int8_channel   8 + 32 / K             absmax per output row
    int8_zeropoint 8 + 64 / K             scale and zero-point per output row
    int4           4 + 32 / P             group-wise absmax, P = group_size
    nf4            4 + 8 / P + 32 / 256P  NF4 with double-quantized scales (block_size = group_size)

Usage:
    model = quantize_model(model, config=QuantConfig(scheme="nf4", group_size=64))
    ppl = perplexity(model, val_tokens, seq_len=64, batch_size=8, num_batches=4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data import batches

from .nf4 import NF4Config, NF4Weight, dequantize_nf4, quantize_nf4
from .quantize import (Int4Weight, absmax_dequantize, absmax_quantize, int4_dequantize, int4_quantize,
                       zeropoint_dequantize, zeropoint_quantize)

SCHEMES = ("int8_tensor", "int8_channel", "int8_zeropoint", "int4", "nf4")

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """scheme: one of SCHEMES. group_size: P for int4, the block size for nf4 (must divide every layer's K)."""

    scheme: str = "int8_channel"
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantConfig.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"QuantConfig.group_size must be a positive even number, got {self.group_size}")


# -----------------------------------------------------------------------------
# The quantized layer


class QuantizedLinear(nn.Module):
    """A drop-in nn.Linear whose weight is stored quantized and dequantized on every forward (weight-only).

    Attributes:
        in_features, out_features: K and N.
        scheme: the QuantConfig scheme.
        weight_q: what the scheme stores (int8 tensors with their scales, an Int4Weight, or an NF4Weight).
        bias: the original bias (kept in full precision), or None.

    The quantized tensors are plain attributes, not buffers, so `.to(device)` does not move them: quantize the model
    on the device it will run on.
    """

    def __init__(self, linear: nn.Linear, *, config: QuantConfig):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = config.scheme
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = linear.weight.dtype
        w = linear.weight.detach()
        # TODO (lab02): your code here
        raise NotImplementedError("lab02: QuantizedLinear.__init__ is not implemented yet (lab02_numerics/quantized_model.py)")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' (N, K) in `dtype` (default: the original weight's dtype)."""
        dtype = dtype or self.compute_dtype
        # TODO (lab02): your code here
        raise NotImplementedError("lab02: QuantizedLinear.dequantized_weight is not implemented yet (lab02_numerics/quantized_model.py)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # dequantize-then-matmul; on a GPU, w4a16.py fuses the two for int4/nf4
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def weight_nbytes(self) -> int:
        """Bytes of the stored (quantized) weight, scales included."""
        q = self.weight_q
        if isinstance(q, (Int4Weight, NF4Weight)):
            return q.nbytes()
        return sum(t.numel() * t.element_size() for t in q)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


# -----------------------------------------------------------------------------
# Public entry points


def quantize_model(model: nn.Module, *, config: QuantConfig) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a QuantizedLinear; returns the model.

    A Linear whose weight is shared with another module (a tied LM head and embedding) is left alone: quantizing it
    would silently untie the two.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: quantize_model is not implemented yet (lab02_numerics/quantized_model.py)")


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, *, seq_len: int, batch_size: int, num_batches: int,
               seed: int = 0) -> float:
    """exp(mean next-token NLL) of `model` over `num_batches` seeded random windows of `tokens`.

    The same seed gives the same windows, so two models (before/after quantization) see the same text.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: perplexity is not implemented yet (lab02_numerics/quantized_model.py)")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight: quantized layers at their stored size, all other parameters at their dtype's."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.weight_nbytes()
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # a tied weight counts once
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total
