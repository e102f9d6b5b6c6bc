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
        # BEGIN SOLUTION
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer (the rank of B A), got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        # END SOLUTION
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one module, or 'all-linear'")

    @property
    def scaling(self) -> float:
        """s in h = W0 x + s B A x: alpha / r, or alpha / sqrt(r) when rank_stabilized."""
        # BEGIN SOLUTION
        return self.alpha / math.sqrt(self.r) if self.rank_stabilized else self.alpha / self.r
        # END SOLUTION


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
    # BEGIN SOLUTION
    base = F.linear(x, weight, bias)
    adapter = F.linear(F.linear(x if x_adapter is None else x_adapter, lora_A), lora_B)
    return (base + scaling * adapter).to(base.dtype)
    # END SOLUTION


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
        # BEGIN SOLUTION
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
        self.base_layer = base_layer
        self.lora_A = nn.Linear(self.in_features, config.r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        # peft's default: A like an nn.Linear of fan-in K, B zero (so h = W0 x at step 0)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # END SOLUTION

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
        # BEGIN SOLUTION
        x_adapter = self.lora_dropout(x)
        x_adapter = None if x_adapter is x else x_adapter  # no dropout (or eval mode): one input, one saved tensor
        weight, bias = self.base_weight(), self.base_layer.bias
        A, B = self.lora_A.weight, self.lora_B.weight
        fast = (not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == A.dtype
                and (bias is None or bias.dtype == x.dtype))
        if fast:
            K = self.in_features
            y = LoRAFunction.apply(x.reshape(-1, K), None if x_adapter is None else x_adapter.reshape(-1, K),
                                   weight, bias, A, B, self.scaling)
            return y.reshape(*x.shape[:-1], self.out_features)
        # Eq. 3 by autograd; an NF4 weight dequantizes inside torchao's linear, which keeps no dense copy
        adapter_input = (x if x_adapter is None else x_adapter).to(A.dtype)
        return lora_forward(x, weight, bias, A, B, self.scaling, x_adapter=adapter_input)
        # END SOLUTION

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s B A (transposed for Conv1D). Does nothing if already merged.

        Raises:
            TypeError: the base weight is quantized (NF4): there is no dense weight to merge into.
        """
        if self.merged:
            return
        _check_dense(self.base_layer.weight)
        # BEGIN SOLUTION
        self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
        self.merged = True
        # END SOLUTION

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - s B A, the exact inverse of merge() up to one rounding in the weight's dtype. Does nothing if
        not merged."""
        if not self.merged:
            return
        # BEGIN SOLUTION
        self.base_layer.weight.sub_(self.delta_weight().to(self.base_layer.weight.dtype))
        self.merged = False
        # END SOLUTION

    def delta_weight(self) -> torch.Tensor:
        """s B A in fp32 (at least), laid out like the stored weight: (N, K), or (K, N) for Conv1D."""
        # BEGIN SOLUTION
        dtype = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        delta = self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))  # (N, K)
        return delta.t() if self.fan_in_fan_out else delta
        # END SOLUTION

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
        # BEGIN SOLUTION
        dense = weight.to(x.dtype)  # a dense weight of x's dtype is returned as is; an NF4 one is dequantized
        adapter_input = x if x_adapter is None else x_adapter
        h = adapter_input @ lora_A.t()  # (M, r)
        y = x @ dense.t() if bias is None else torch.addmm(bias, x, dense.t())  # (M, N)
        y.addmm_(h, lora_B.t(), alpha=scaling)  # y += s h B^T, accumulated in place by the GEMM
        # dL/dx needs only W0; dL/dA needs the adapter's input; dL/dB needs h. The weight is saved as stored (NF4)
        ctx.save_for_backward(adapter_input, weight, lora_A, lora_B, h)
        ctx.scaling, ctx.has_dropout = scaling, x_adapter is not None
        return y
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad_y):
        # BEGIN SOLUTION
        adapter_input, weight, lora_A, lora_B, h = ctx.saved_tensors
        s = ctx.scaling
        grad_h = (grad_y @ lora_B) * s  # (M, r): dL/dh, the scale folded into the thin matrix
        grad_x = grad_x_adapter = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight.to(grad_y.dtype)  # (M, K): the frozen weight's only GEMM (NF4: dequantized again)
            if not ctx.has_dropout:
                grad_x.addmm_(grad_h, lora_A)  # + s (g B) A, accumulated in place
        if ctx.has_dropout and ctx.needs_input_grad[1]:
            grad_x_adapter = grad_h @ lora_A  # (M, K), flows back through the dropout mask
        if ctx.needs_input_grad[4]:
            grad_A = grad_h.t() @ adapter_input  # (r, K)
        if ctx.needs_input_grad[5]:
            grad_B = grad_y.t() @ (h * s)  # (N, r)
        return grad_x, grad_x_adapter, None, None, grad_A, grad_B, None
        # END SOLUTION


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
