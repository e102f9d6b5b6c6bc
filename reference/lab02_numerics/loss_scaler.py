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
    # BEGIN SOLUTION
    if not grads:
        return False
    # one small kernel per tensor, one stack, one sync: per-tensor .item() calls would sync ~100 times per step
    all_finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return not bool(all_finite)
    # END SOLUTION


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
        # BEGIN SOLUTION
        return loss * self.scale_value
        # END SOLUTION

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide every gradient by S in place and record whether any is inf/NaN. Returns that flag.

        Raises:
            RuntimeError: called twice in one iteration (the gradients would be divided twice).
        """
        if self._found_inf is not None:
            raise RuntimeError("unscale_ was already called this iteration; call update() first")
        # BEGIN SOLUTION
        grads = grads_of(optimizer)
        # 1/S in fp64 then rounded, as GradScaler does; S is a power of two in practice, so this is exact
        inv_scale = float(torch.tensor(self.scale_value, dtype=torch.float64).reciprocal().float())
        if grads:
            torch._foreach_mul_(grads, inv_scale)
        self._found_inf = found_non_finite(grads)
        return self._found_inf
        # END SOLUTION

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale (if `unscale_` was not called), then `optimizer.step()` unless a gradient overflowed.

        Returns:
            True when the optimizer stepped, False when the step was skipped.
        """
        # BEGIN SOLUTION
        if self._found_inf is None:
            self.unscale_(optimizer)
        if self._found_inf:
            self.num_skipped += 1
            return False
        optimizer.step()
        return True
        # END SOLUTION

    def update(self) -> None:
        """Back off on overflow, grow after `growth_interval` clean steps; then reset for the next iteration.

        Raises:
            RuntimeError: no `unscale_`/`step` ran since the last update.
        """
        if self._found_inf is None:
            raise RuntimeError("update() needs a step() (or unscale_()) in this iteration first")
        # BEGIN SOLUTION
        cfg = self.config
        if self._found_inf:
            self.scale_value *= cfg.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == cfg.growth_interval:
                grown = self.scale_value * cfg.growth_factor
                # GradScaler grows only to a finite scale (fp32), so a long clean run cannot overflow S itself
                if math.isfinite(grown) and grown <= torch.finfo(torch.float32).max:
                    self.scale_value = grown
                self.growth_tracker = 0
        self._found_inf = None
        # END SOLUTION

    def get_scale(self) -> float:
        return self.scale_value

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "growth_tracker": self.growth_tracker, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.num_skipped = int(state.get("num_skipped", 0))
