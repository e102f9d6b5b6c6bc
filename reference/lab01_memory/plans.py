"""Checkpoint plans: which blocks of the model run under `checkpoint`, grouped into segments.

A plan is a list of half-open segments [start, stop) of block indices; each segment runs as one checkpointed unit, so
it keeps only its input, and blocks outside every segment run normally. With L blocks, a per-block activation cost A
and a block-input cost I (I << A in a transformer), the activations kept by the forward are

    none                 L * A
    every_k (k)          L * A - ceil(L / k) * (A - I)        checkpoint blocks 0, k, 2k, ... one at a time
    segments (s)         s * I                                 s contiguous segments cover all L blocks
    sqrt                 segments with s = round(sqrt(L))      Chen et al. 2016, Section 3.1

and the backward briefly adds back the internals of the largest segment being recomputed, so the peak is about
s * I + (L / s) * A, minimised at s = sqrt(L * A / I): with A and I of the same order this is Chen et al.'s
O(sqrt(L)) memory for one extra forward (arXiv:1604.06174).

Usage:
    model = apply_checkpointing(model, config=CheckpointConfig(plan="sqrt"))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from common.model import Transformer

from .checkpoint import checkpoint

PLANS = ("none", "every_k", "segments", "sqrt")

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """plan: one of PLANS; k: for every_k; num_segments: for segments."""

    plan: str = "none"
    k: int = 1
    num_segments: int = 1

    def __post_init__(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"CheckpointConfig.plan must be one of {PLANS}, got {self.plan!r}")
        if self.k < 1:
            raise ValueError(f"CheckpointConfig.k must be >= 1, got {self.k}")
        if self.num_segments < 1:
            raise ValueError(f"CheckpointConfig.num_segments must be >= 1, got {self.num_segments}")


# -----------------------------------------------------------------------------
# Public entry points


def plan_segments(num_blocks: int, config: CheckpointConfig) -> list[tuple[int, int]]:
    """The checkpointed segments [start, stop) for a model of `num_blocks` blocks, in order.

    Raises:
        ValueError: num_blocks < 1, or a plan asking for more segments than there are blocks.
    """
    if num_blocks < 1:
        raise ValueError(f"plan_segments: num_blocks must be >= 1, got {num_blocks}")
    # BEGIN SOLUTION
    if config.plan == "none":
        return []
    if config.plan == "every_k":
        return [(start, start + 1) for start in range(0, num_blocks, config.k)]
    if config.plan == "sqrt":
        return even_segments(num_blocks, max(1, round(math.sqrt(num_blocks))))
    return even_segments(num_blocks, config.num_segments)
    # END SOLUTION


def even_segments(num_blocks: int, num_segments: int) -> list[tuple[int, int]]:
    """Split blocks 0..num_blocks-1 into `num_segments` contiguous segments whose sizes differ by at most one.

    The first `num_blocks % num_segments` segments get the extra block, e.g. 5 blocks into 2 -> [(0, 3), (3, 5)].
    """
    if num_segments > num_blocks:
        raise ValueError(f"plan asks for {num_segments} segments but the model has only {num_blocks} blocks")
    # BEGIN SOLUTION
    base, extra = divmod(num_blocks, num_segments)
    segments, start = [], 0
    for index in range(num_segments):
        stop = start + base + (1 if index < extra else 0)
        segments.append((start, stop))
        start = stop
    return segments
    # END SOLUTION


def apply_checkpointing(model: Transformer, *, config: CheckpointConfig) -> Transformer:
    """Install a block runner that checkpoints the plan's segments; parameters and their names are unchanged."""
    segments = plan_segments(len(model.blocks), config)
    model.block_runner = SegmentRunner(segments)
    return model


# -----------------------------------------------------------------------------
# The runner


class SegmentRunner:
    """Runs blocks in order; each segment [start, stop) runs as one `checkpoint` call."""

    def __init__(self, segments: list[tuple[int, int]]):
        self.segments = segments

    def __call__(self, blocks: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        starts = {start: stop for start, stop in self.segments}
        index = 0
        while index < len(blocks):
            # BEGIN SOLUTION
            if index in starts:
                stop = starts[index]
                x = checkpoint(_run_range(blocks, index, stop), x, cos, sin)
                index = stop
            else:
                x = blocks[index](x, cos, sin)
                index += 1
            # END SOLUTION
        return x


def _run_range(blocks: nn.ModuleList, start: int, stop: int) -> Callable[..., torch.Tensor]:
    """A function running blocks[start:stop] in order: the unit one checkpoint recomputes."""

    def run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for block in blocks[start:stop]:
            x = block(x, cos, sin)
        return x

    return run
