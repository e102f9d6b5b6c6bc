"""LoRA: fine-tune a frozen linear layer through a trainable low-rank update.

What it saves: a (N, K) weight's gradient and its two Adam moments (3 N K numbers) become those of two thin matrices,
r (N + K) numbers with r << min(N, K); the frozen weight also needs no gradient GEMM in backward. Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, Eq. 3 and Section 4.1:

    h = W0 x + (alpha / r) B A x          W0 (N, K) frozen, A (r, K), B (N, r) trained

A is initialised like an nn.Linear of fan-in K (peft's default: kaiming_uniform_ with a = sqrt(5), i.e.
U(-1/sqrt(K), 1/sqrt(K))) and B is zero, so training starts exactly at the pretrained model. Dropout applies to the
adapter's input only. Rank-stabilised LoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead,
so that the update's size does not shrink as r grows. After training, merge() folds the update into the weight,
W = W0 + (alpha / r) B A, so inference costs nothing extra; unmerge() takes it out again.

The backward pass, written out (LoRAFunction), with g = dL/dh and s the scale:

    dL/dx = g W0 + s (g B) A          dL/dA = s (g B)^T x          dL/dB = s g^T (x A^T)          (no dL/dW0)

A frozen W0 costs one GEMM in backward (dL/dx) instead of two, so a LoRA step does about 4 of a full step's 6 units of
weight GEMM work. LoRAFunction also adds the low-rank product into the base output in place (one addmm with beta = 1)
rather than as separate scale, add and cast kernels, and it never keeps a dense copy of an NF4 weight (qlora.py): the
weight is dequantized in forward and again in backward.

Usage:
    layer = LoRALinear(model.model.layers[0].self_attn.q_proj, config=LoRAConfig(r=8, alpha=16))
    y = layer(x)                       # (B, N, K) -> (B, N, out)
    layer.merge(); ...; layer.unmerge()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """The adapters of a model (peft's LoraConfig, by its defaults: r 8, lora_alpha 8, no dropout, q_proj/v_proj).

    Attributes:
        r: rank of the update, a positive integer.
        alpha: scale numerator: the update is (alpha / r) B A (or alpha / sqrt(r) with rank_stabilized).
        dropout: probability of dropping an input element on the adapter path (training mode only), in [0, 1).
        target_modules: which modules get adapters: module-name suffixes ("q_proj", "mlp.down_proj": a module
            matches when its name equals one or ends with "." + one), "all-linear" (every linear layer but the
            output layer), or any other single string as a regular expression matched against whole module names.
        rank_stabilized: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
        adapter_dtype: dtype of A and B; None keeps the base weight's dtype (a bf16 model gets bf16 adapters).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    rank_stabilized: bool = False
    adapter_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):  # accept a list, keep the frozen config hashable
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRAConfig.__post_init__ is not implemented yet (lab06_lora/lora.py)")
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one module, or 'all-linear'")

    @property
    def scaling(self) -> float:
        """s in h = W0 x + s B A x: alpha / r, or alpha / sqrt(r) when rank_stabilized."""
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRAConfig.scaling is not implemented yet (lab06_lora/lora.py)")


# -----------------------------------------------------------------------------
# Plain-PyTorch version: Eq. 3, what every other path must equal


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float, x_adapter: torch.Tensor | None = None) -> torch.Tensor:
    """h = x W0^T + b + s (x' A^T) B^T, with x' = x_adapter (the dropped-out input, already in A's dtype) or x.

    Args:
        x: (..., K) input.
        weight: (N, K) frozen base weight W0 (an NF4 weight works too: F.linear dequantizes it).  bias: (N,) or None.
        lora_A: (r, K).  lora_B: (N, r).  scaling: s.
        x_adapter: (..., K) input of the adapter path, or None for x itself.

    Returns:
        (..., N), in the dtype of the base path x W0^T + b (the adapter path is cast to it, as peft does).
    """
    # TODO (lab06): your code here
    raise NotImplementedError("lab06: lora_forward is not implemented yet (lab06_lora/lora.py)")


# -----------------------------------------------------------------------------
# Public entry point: the layer


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (peft's names: base_layer, lora_A, lora_B, lora_dropout,
    so that state-dict keys read like peft's).

    Wraps nn.Linear (weight (N, K)) or transformers' Conv1D (GPT-2's layers: weight (K, N), y = x W + b).

    Args:
        base_layer: the layer to adapt; its parameters are frozen (requires_grad False) here.
        config: r, alpha, dropout, rank_stabilized and adapter_dtype (target_modules is for apply_lora).

    Raises:
        TypeError: base_layer is neither nn.Linear nor Conv1D.
    """

    def __init__(self, base_layer: nn.Module, *, config: LoRAConfig):
        super().__init__()
        if not _is_linear(base_layer):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}")
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D stores W0 transposed, as (K, N)
        weight = base_layer.weight
        self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.r, self.scaling, self.merged = config.r, config.scaling, False
        dtype = config.adapter_dtype or weight.dtype
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRALinear.__init__ is not implemented yet (lab06_lora/lora.py)")

    def base_weight(self) -> torch.Tensor:
        """W0 as (N, K): the stored weight, transposed (a view) for Conv1D. May be an NF4 tensor (qlora.py)."""
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + b + s B A dropout(x): (..., K) -> (..., N).

        Fast path (LoRAFunction) when x, W0 and the adapters share a dtype and autocast is off; otherwise Eq. 3 with
        the adapter's input cast to the adapters' dtype (as peft does) and the result cast back to the base's dtype.
        A merged layer is just its base layer.
        """
        if self.merged:
            return self.base_layer(x)
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRALinear.forward is not implemented yet (lab06_lora/lora.py)")

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s B A (transposed for Conv1D). Does nothing if already merged.

        Raises:
            TypeError: the base weight is quantized (NF4): there is no dense weight to merge into.
        """
        if self.merged:
            return
        _check_dense(self.base_layer.weight)
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRALinear.merge is not implemented yet (lab06_lora/lora.py)")

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - s B A, the exact inverse of merge() up to one rounding in the weight's dtype. Does nothing if
        not merged."""
        if not self.merged:
            return
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRALinear.unmerge is not implemented yet (lab06_lora/lora.py)")

    def delta_weight(self) -> torch.Tensor:
        """s B A in fp32 (at least), laid out like the stored weight: (N, K), or (K, N) for Conv1D."""
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRALinear.delta_weight is not implemented yet (lab06_lora/lora.py)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}"


# -----------------------------------------------------------------------------
# The autograd Function: the backward pass written out


class LoRAFunction(torch.autograd.Function):
    """h = x W0^T + b + s (x' A^T) B^T on flattened inputs, with the backward above (no GEMM for dL/dW0).

    forward args: x (M, K); x_adapter (M, K) or None (then x' = x); weight (N, K) frozen, dense or NF4 (dequantized
    on the fly, in forward and again in backward, never saved dense); bias (N,) frozen or None; lora_A (r, K);
    lora_B (N, r); scaling (float). All dense tensors in one dtype. Returns (M, N).
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lora_A, lora_B, scaling):
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRAFunction.forward is not implemented yet (lab06_lora/lora.py)")

    @staticmethod
    def backward(ctx, grad_y):
        # TODO (lab06): your code here
        raise NotImplementedError("lab06: LoRAFunction.backward is not implemented yet (lab06_lora/lora.py)")


# -----------------------------------------------------------------------------
# Helpers


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (a linear layer that stores its weight as (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _check_dense(weight: torch.Tensor) -> None:
    if type(weight) not in (torch.Tensor, nn.Parameter):
        raise TypeError(f"cannot merge into a {type(weight).__name__} base weight (quantized): merge needs a dense "
                        "weight; dequantize the base first")
