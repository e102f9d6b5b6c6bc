"""QLoRA: LoRA on a frozen base stored in 4-bit NormalFloat (NF4) with double quantization.

What it saves: the frozen base weights, which dominate LoRA's memory, shrink from 16 bits to ~4.13 bits per weight
(3.9x less than bf16). Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314, Eq. 5:

    Y = X doubleDequant(c1_fp32, c2_k-bit, W_NF4) + X L1 L2         (here: X W0'^T + s (X A^T) B^T)

NF4 (Section 3): blocks of 64 consecutive weights are scaled by their absmax c1 and each weight is replaced by the
index of the nearest of 16 levels placed at quantiles of N(0, 1) (4 bits). Double quantization: the block scales are
themselves quantized to 8 bits, centred by their mean, in blocks of 256 with one constant c2 each, which cuts their
cost from 0.5 to ~0.127 bits per weight. The base is never trained: the forward dequantizes each weight to the
compute dtype (bf16) just before its GEMM, and backward dequantizes it again for dL/dX; no dense copy is kept. The
adapters stay in bf16 (or fp32) and get all the gradient.

Where NF4 comes from. Lab 02 builds this format; lab 06 must not depend on a student's lab 02, and lab 02's solution
must not ship with lab 06. So this lab uses torchao's NF4Tensor (torchao.quantization.quantize_.workflows.nf4, the
QLoRA format with double quantization, as torchtune uses it): pure PyTorch, so it runs on CPU and GPU alike. Its
`.to(dtype)` dequantizes; its second-level constants are stored in the weight's dtype. QLoRA's paged optimizers (Adam
state paged to CPU memory by CUDA unified memory) are left out: they only absorb memory spikes on a GPU near its limit,
and on a CPU, or with the state of a few million adapter parameters, there is nothing to page.

Usage:
    model = apply_qlora(model.to(torch.bfloat16), config=LoRAConfig(r=16, target_modules="all-linear"))
    print(weight_bytes(model))          # ~0.26 bytes per quantized weight instead of 2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .inject import apply_lora, find_targets
from .lora import LoRAConfig, LoRALinear

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class NF4Config:
    """block_size: weights per absmax scale c1 (QLoRA: 64). scaler_block_size: scales per second-level constant c2
    (QLoRA: 256; a layer with fewer scales, or a count 256 does not divide, uses the largest common divisor)."""

    block_size: int = 64
    scaler_block_size: int = 256

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"NF4Config.block_size must be a positive even number, got {self.block_size}")
        if self.scaler_block_size <= 0:
            raise ValueError(f"NF4Config.scaler_block_size must be positive, got {self.scaler_block_size}")


# -----------------------------------------------------------------------------
# Public entry points


def apply_qlora(model: nn.Module, *, config: LoRAConfig, nf4: NF4Config | None = None) -> nn.Module:
    """QLoRA, in place: every linear layer but the output layer gets an NF4 base, and the targets get adapters.

    Args:
        model: a HF model, usually already in bf16 (NF4 keeps the weights' dtype as its compute dtype).
        config: the adapters (apply_lora's config).
        nf4: the quantization's block sizes.

    Returns:
        The same model: frozen NF4 weights in all its linear layers, LoRALinear layers on the targets.

    Raises:
        ValueError / TypeError: as apply_lora; ValueError if a layer's in_features is not a multiple of block_size;
            TypeError for a linear layer that is not nn.Linear (GPT-2's Conv1D).
    """
    nf4 = nf4 or NF4Config()
    # BEGIN SOLUTION
    for name in find_targets(model, "all-linear"):  # quantize first, so the adapters' own layers stay dense
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"apply_qlora quantizes nn.Linear layers; {name} is a {type(module).__name__}")
        module.weight = quantize_nf4_weight(module.weight, config=nf4)
    return apply_lora(model, config=config)
    # END SOLUTION


def quantize_nf4_weight(weight: torch.Tensor, *, config: NF4Config) -> nn.Parameter:
    """A frozen parameter holding `weight` (N, K) in NF4 with double quantization (torchao's NF4Tensor).

    Blocks run along K within each row, so K must be a multiple of block_size. The second-level block is the largest
    divisor of the layer's scale count (N K / block_size) that divides config.scaler_block_size, i.e. their gcd.

    Returns:
        nn.Parameter(NF4Tensor, requires_grad=False), shape (N, K), nominal dtype that of `weight`.

    Raises:
        TypeError: not a floating-point 2-D weight.  ValueError: K not a multiple of block_size.
    """
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    # BEGIN SOLUTION
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"quantize_nf4_weight: expected a 2-D floating-point weight, got {tuple(weight.shape)} "
                        f"{weight.dtype}")
    N, K = weight.shape
    if K % config.block_size:
        raise ValueError(f"quantize_nf4_weight: in_features ({K}) must be a multiple of block_size "
                         f"({config.block_size})")
    num_scales = N * K // config.block_size
    quantized = to_nf4(weight.detach().contiguous(), config.block_size,
                       math.gcd(num_scales, config.scaler_block_size))
    return nn.Parameter(quantized, requires_grad=False)
    # END SOLUTION


def nf4_bytes(weight: torch.Tensor) -> int:
    """Bytes an NF4 weight occupies: its 4-bit codes, int8 scales, second-level constants, mean and 16-level table."""
    # BEGIN SOLUTION
    inner, _ = weight.__tensor_flatten__()  # the names of the tensors it is made of
    return sum(getattr(weight, name).numel() * getattr(weight, name).element_size() for name in inner)
    # END SOLUTION


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters: NF4 weights at their packed size, every other one at numel * element size."""
    total = 0
    for parameter in model.parameters():
        total += nf4_bytes(parameter) if is_nf4(parameter) else parameter.numel() * parameter.element_size()
    return total


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a torchao NF4Tensor (False when torchao is not installed: then nothing is)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
    except ImportError:
        return False
    return isinstance(tensor, NF4Tensor)


def qlora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> LoRALinear whose base weight is NF4."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoRALinear) and is_nf4(module.base_layer.weight)}
