"""A dynamic loss scaler: fp16 training without underflowing gradients, and without dying of overflow.

What it saves: fp16 has 5 exponent bits, so gradients below 2^-24 flush to zero and above 65504 overflow to inf.
Many activation gradients of a transformer live around 2^-20..2^-30 and would vanish. Scaling the loss by S before
backward scales every gradient by S (the chain rule is linear), moving them into fp16's range; the optimizer then sees
g = (S g) / S in fp32 (Micikevicius et al. 2018, "Mixed Precision Training", arXiv:1710.03740, Section 3.2).

S is unknown in advance, so it adapts (the algorithm of torch.amp.GradScaler, whose trajectory this one follows):

    every iteration:   backward(S * loss);  g <- g / S                         (unscale, in fp32)
    if any g is inf/NaN:   skip optimizer.step();  S <- S * backoff_factor;  good_steps <- 0
    else:                  optimizer.step();  good_steps += 1
                           if good_steps == growth_interval:  S <- S * growth_factor;  good_steps <- 0

Gradient clipping must see the true gradients, so unscale *before* clipping (`unscale_`, then clip, then `step`).

Usage:
    scaler = DynamicLossScaler(LossScalerConfig(growth_interval=2000))
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                      # optional: only needed to clip or inspect gradients
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(optimizer)                          # skipped when a gradient overflowed
    scaler.update()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class LossScalerConfig:
    """GradScaler's defaults: start at 2^16, double after 2000 clean steps, halve on overflow."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {self.init_scale}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval}")


# -----------------------------------------------------------------------------
# Plain-PyTorch helpers


def grads_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every existing .grad of the optimizer's parameters, in param-group order."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def found_non_finite(grads: list[torch.Tensor]) -> bool:
    """Whether any gradient holds an inf or a NaN (one host sync for all of them)."""
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: found_non_finite is not implemented yet (lab02_numerics/loss_scaler.py)")


# -----------------------------------------------------------------------------
# The scaler


class DynamicLossScaler:
    """The state machine above. `scale` is a Python float; `growth_tracker` counts clean steps since the last change.

    Per iteration, call `scale(loss).backward()`, optionally `unscale_(optimizer)`, then `step(optimizer)` and
    `update()`, in that order (the same protocol as torch.amp.GradScaler).
    """

    def __init__(self, config: LossScalerConfig | None = None):
        self.config = config or LossScalerConfig()
        self.scale_value: float = self.config.init_scale
        self.growth_tracker: int = 0
        # per-iteration state: None until unscale_ ran this iteration, then whether a gradient overflowed
        self._found_inf: bool | None = None
        self.num_skipped: int = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """S * loss, so that backward produces gradients scaled by S."""
        # TODO (lab02): your code here
        raise NotImplementedError("lab02: DynamicLossScaler.scale is not implemented yet (lab02_numerics/loss_scaler.py)")

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide every gradient by S in place and record whether any is inf/NaN. Returns that flag.

        Raises:
            RuntimeError: called twice in one iteration (the gradients would be divided twice).
        """
        if self._found_inf is not None:
            raise RuntimeError("unscale_ was already called this iteration; call update() first")
        # TODO (lab02): your code here
        raise NotImplementedError("lab02: DynamicLossScaler.unscale_ is not implemented yet (lab02_numerics/loss_scaler.py)")

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale (if `unscale_` was not called), then `optimizer.step()` unless a gradient overflowed.

        Returns:
            True when the optimizer stepped, False when the step was skipped.
        """
        # TODO (lab02): your code here
        raise NotImplementedError("lab02: DynamicLossScaler.step is not implemented yet (lab02_numerics/loss_scaler.py)")

    def update(self) -> None:
        """Back off on overflow, grow after `growth_interval` clean steps; then reset for the next iteration.

        Raises:
            RuntimeError: no `unscale_`/`step` ran since the last update.
        """
        if self._found_inf is None:
            raise RuntimeError("update() needs a step() (or unscale_()) in this iteration first")
        # TODO (lab02): your code here
        raise NotImplementedError("lab02: DynamicLossScaler.update is not implemented yet (lab02_numerics/loss_scaler.py)")

    def get_scale(self) -> float:
        return self.scale_value

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "growth_tracker": self.growth_tracker, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.num_skipped = int(state.get("num_skipped", 0))
