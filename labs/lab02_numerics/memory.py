"""Memory accounting for model states: bytes per parameter for fp32 and mixed-precision Adam, predicted and measured.

What it tells you: mixed precision does *not* shrink the model states of Adam training. Rajbhandari et al. 2020 (ZeRO,
arXiv:1910.02054, Section 3.1) count, for Psi parameters trained with mixed-precision Adam,

    2 Psi (fp16 parameters) + 2 Psi (fp16 gradients) + K Psi (fp32 master weights, momentum, variance), K = 4 + 4 + 4,

16 Psi bytes in all: a 7.5 B-parameter model needs 120 GB before a single activation. Plain fp32 Adam also needs
4 + 4 + 8 = 16 bytes. What mixed precision saves is activation memory and time (tensor cores); ZeRO (lab 05) is what
shrinks the 16 bytes, by sharding them.

Recipes (bytes per parameter: parameters, gradients, fp32 master copy, optimizer state):
    fp32_adam    4 + 4 + 0 + 8 = 16      torch.optim.Adam on an fp32 model (also the autocast recipe)
    mixed_adam   2 + 2 + 4 + 8 = 16      fp16/bf16 model + fp32 masters (master_weights.MasterWeightOptimizer)
    bf16_adam    2 + 2 + 0 + 4 = 8       everything in bf16, no masters (cheap, and loses small updates)
    fp32_sgd     4 + 4 + 0 + 0 = 8       plain SGD, no state

Usage:
    predicted = model_state_bytes(model.num_params(), RECIPES["mixed_adam"])
    measured = measure_model_state_bytes(model, optimizer, master_params=opt.master_params)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class PrecisionRecipe:
    """Bytes per parameter of each kind of model state."""

    name: str
    param_bytes: int
    grad_bytes: int
    master_bytes: int
    optimizer_bytes: int

    def __post_init__(self) -> None:
        for field in ("param_bytes", "grad_bytes", "master_bytes", "optimizer_bytes"):
            if getattr(self, field) < 0:
                raise ValueError(f"PrecisionRecipe.{field} must be >= 0, got {getattr(self, field)}")

    @property
    def bytes_per_param(self) -> int:
        return self.param_bytes + self.grad_bytes + self.master_bytes + self.optimizer_bytes


RECIPES = {
    "fp32_adam": PrecisionRecipe(name="fp32_adam", param_bytes=4, grad_bytes=4, master_bytes=0, optimizer_bytes=8),
    "mixed_adam": PrecisionRecipe(name="mixed_adam", param_bytes=2, grad_bytes=2, master_bytes=4, optimizer_bytes=8),
    "bf16_adam": PrecisionRecipe(name="bf16_adam", param_bytes=2, grad_bytes=2, master_bytes=0, optimizer_bytes=4),
    "fp32_sgd": PrecisionRecipe(name="fp32_sgd", param_bytes=4, grad_bytes=4, master_bytes=0, optimizer_bytes=0),
}


@dataclass(frozen=True)
class ModelStateBytes:
    """Measured bytes of each kind of model state, and their sum."""

    params: int
    grads: int
    master: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer


# -----------------------------------------------------------------------------
# Predicted


def model_state_bytes(num_params: int, recipe: PrecisionRecipe) -> int:
    """(param + grad + master + optimizer bytes) * Psi: the ZeRO paper's (2 + 2 + K) Psi for mixed_adam.

    Raises:
        ValueError: a negative parameter count.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: model_state_bytes is not implemented yet (lab02_numerics/memory.py)")


# -----------------------------------------------------------------------------
# Measured


def measure_model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                              master_params: Iterable[torch.Tensor] = ()) -> ModelStateBytes:
    """Bytes held by the model's parameters, their .grad, the fp32 masters, and the optimizer's per-parameter state.

    Each storage counts once (tied weights, views). Optimizer state counts only tensors with as many elements as their
    parameter (Adam's exp_avg, exp_avg_sq); its scalar `step` counters are bookkeeping, not per-parameter state.
    Call after at least one optimizer step, so that the state and the gradients exist.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: measure_model_state_bytes is not implemented yet (lab02_numerics/memory.py)")
