"""Measuring and predicting the activation memory of each checkpoint plan.

Measured: the bytes autograd saves during one forward (`common.measure.SavedTensorMeter`, works on CPU and GPU;
parameters and buffers excluded, each storage counted once).

Predicted, from the memory equation of `plans.py`. Let S be the bytes saved with no checkpointing, S_b the bytes
block b saves on its own, and I_s the bytes of the input of segment s. Every pre-norm block saves its own input
(RMSNorm needs it), so checkpointing segment s = [start, stop) replaces what its blocks saved by its input alone:

    saved(plan) = S - sum over segments s of ( sum_{b in s} S_b - I_s )

Usage:
    report = measure_plans(model, tokens, targets, plans={"none": CheckpointConfig(), "sqrt": ...})
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from common.measure import SavedTensorMeter
from common.model import Transformer

from .plans import CheckpointConfig, apply_checkpointing, plan_segments


@dataclass(frozen=True)
class PlanMemory:
    plan: str
    measured_bytes: int
    predicted_bytes: int


# -----------------------------------------------------------------------------
# Public entry points


def saved_bytes(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> int:
    """Activation bytes saved for backward by one forward of `model.loss(tokens, targets)`."""
    not_activations = list(model.parameters()) + list(model.buffers())
    with SavedTensorMeter(exclude=not_activations) as meter:
        loss = model.loss(tokens, targets)
    del loss
    return meter.total_bytes


def block_saved_bytes(model: Transformer, tokens: torch.Tensor) -> tuple[list[int], int]:
    """(S_b for each block, I = bytes of one block input), measured by running the blocks one at a time."""
    not_activations = list(model.parameters()) + list(model.buffers())
    N = tokens.shape[1]
    cos, sin = model.rope_cos[:N], model.rope_sin[:N]
    with torch.no_grad():
        x = model.embed(tokens)  # (B, N, C)
    per_block = []
    for block in model.blocks:
        x = x.detach().requires_grad_(True)
        with SavedTensorMeter(exclude=not_activations) as meter:
            y = block(x, cos, sin)
        per_block.append(meter.total_bytes)
        x = y
    return per_block, x.untyped_storage().nbytes()


def predict_saved_bytes(
    baseline_bytes: int, per_block: list[int], input_bytes: int, config: CheckpointConfig
) -> int:
    """saved(plan) = S - sum_s (sum_{b in s} S_b - I_s), with every block input of `input_bytes`."""
    # BEGIN SOLUTION
    saved = baseline_bytes
    for start, stop in plan_segments(len(per_block), config):
        saved -= sum(per_block[start:stop]) - input_bytes
    return saved
    # END SOLUTION


def measure_plans(
    model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, plans: dict[str, CheckpointConfig]
) -> list[PlanMemory]:
    """Measured and predicted saved-activation bytes for each named plan (the model itself is left unchanged)."""
    baseline = saved_bytes(model, tokens, targets)
    per_block, input_bytes = block_saved_bytes(model, tokens)
    report = []
    for name, config in plans.items():
        planned = apply_checkpointing(copy.deepcopy(model), config=config)
        measured = saved_bytes(planned, tokens, targets)
        predicted = predict_saved_bytes(baseline, per_block, input_bytes, config)
        report.append(PlanMemory(plan=name, measured_bytes=measured, predicted_bytes=predicted))
    return report
