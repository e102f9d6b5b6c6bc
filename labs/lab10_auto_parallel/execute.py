"""Executing a plan: common.model's Transformer trained under dp x tp x pp, ZeRO and checkpointing, composed from
labs 03, 04 and 05 the way torchtitan composes its apply_* functions.

What it shows: the planner's output is not a paper plan. On a common.mesh.build_mesh(dp, pp, tp) mesh, in order:

    tensor parallel   lab04 apply_tensor_parallel(model, tp_group)          Megatron-LM layers, vocab-parallel loss
    checkpointing     every block's forward under torch.utils.checkpoint    (Chen et al. 2016, arXiv:1604.06174)
    pipeline          lab04 PipelineStage + PipelineRuntime (1F1B) on pp_group, m micro-batches
    data parallel     ZeRO 0: lab03 BucketedDDP on dp_group + torch AdamW; ZeRO 1-3: lab05 apply_zero on dp_group

Every rank passes the same full model (the same seed) and the same global batches; data-parallel replica r trains
on rows [r B/dp, (r+1) B/dp) of each batch. The loss of a step is the mean over the whole global batch, the same on
every rank, and equals single-process training with AdamW (same hyperparameters) up to rounding. Under ZeRO 0 the
micro-batches' backwards run inside BucketedDDP.no_sync() and one finish() all-reduces the accumulated gradients
(one bucketed all-reduce per step, whatever m is, as the cost model assumes).

ZeRO-2 and -3 are refused with pipeline parallelism (as DeepSpeed refuses them): their per-unit gradient hooks
would reduce-scatter every micro-batch's gradients.

Usage (inside a process group of plan.world_size ranks, e.g. a common.launch.run_distributed worker):
    result = run_plan(ParallelPlan(dp=2, tp=2), model, batches, lr=1e-3)
    result.losses, result.step_times
    trainer = PlanTrainer(plan, model); loss = trainer.step(tokens, targets)     # one step at a time
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from common.mesh import build_mesh
from common.model import Transformer, token_cross_entropy

from .cost_model import ParallelPlan

BETAS, EPS = (0.9, 0.999), 1e-8


@dataclass
class RunResult:
    """losses[i]: the global batch's mean loss at step i (the same on every rank); step_times[i]: this rank's
    seconds for step i. module, engine, optimizer: what this rank trained (for counting its memory)."""

    losses: list[float]
    step_times: list[float]
    module: nn.Module
    engine: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    extra: dict = field(default_factory=dict)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Run every block of `model.blocks` under non-reentrant torch.utils.checkpoint (keeps only block inputs).

    The block modules stay in place (parameter names and ZeRO-3's hooks are unchanged): only their forward is wrapped.
    """
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, cos, sin, forward=forward: checkpoint(forward, x, cos, sin, use_reentrant=False)
    return model


class PlanTrainer:
    """One rank's share of training under a plan: built once, then `step(tokens, targets)` per global batch.

    Args:
        plan: the plan; plan.world_size must be the process group's size.
        model: the full model, the same on every rank (its parameters are taken over; do not reuse it).
        lr, weight_decay: AdamW's (betas (0.9, 0.999), eps 1e-8).

    Attributes:
        mesh: the common.mesh Mesh; module: what this rank trains (a TensorParallelTransformer, a PipelineStage or
        the model); engine: the ZeRO engine (ZeRO 1-3) or None; optimizer: torch's AdamW (ZeRO 0) or None.

    Raises:
        ValueError: a world size that is not plan.world_size; ZeRO-2/3 with pp > 1; a degree that does not divide
            the model (from labs 04 and 05).
    """

    def __init__(self, plan: ParallelPlan, model: Transformer, *, lr: float = 1e-3, weight_decay: float = 0.01):
        from lab03_data_parallel.ddp_bucketed import BucketedDDP
        from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage
        from lab04_model_parallel.sharding import apply_tensor_parallel
        from lab05_zero.config import ZeROConfig, apply_zero

        self.plan = plan
        # TODO (lab10): your code here
        raise NotImplementedError("lab10: PlanTrainer.__init__ is not implemented yet (lab10_auto_parallel/execute.py)")

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        """One training step on the global batch (B, N) int64 (the same on every rank); returns its mean loss.

        Raises:
            ValueError: dp x num_microbatches does not divide B.
        """
        plan = self.plan
        # TODO (lab10): your code here
        raise NotImplementedError("lab10: PlanTrainer.step is not implemented yet (lab10_auto_parallel/execute.py)")


def run_plan(plan: ParallelPlan, model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
             lr: float = 1e-3, weight_decay: float = 0.01) -> RunResult:
    """Train `model` for len(batches) steps under `plan` on this rank (a PlanTrainer), timing each step.

    Args:
        plan, model, lr, weight_decay: as PlanTrainer's.
        batches: (tokens, targets) of the global batch, each (B, N) int64, the same on every rank.

    Returns:
        RunResult.

    Raises:
        ValueError: as PlanTrainer and PlanTrainer.step raise (on every rank, before any collective).
    """
    trainer = PlanTrainer(plan, model, lr=lr, weight_decay=weight_decay)
    losses, times = [], []
    for tokens, targets in batches:
        dist.barrier()  # every rank starts the step together: the slowest rank's time is the step's
        began = time.perf_counter()
        losses.append(trainer.step(tokens, targets))
        times.append(time.perf_counter() - began)
    return RunResult(losses=losses, step_times=times, module=trainer.module, engine=trainer.engine,
                     optimizer=trainer.optimizer)


def _global_loss(loss: torch.Tensor | None, *, holders: int) -> float:
    """The mean of the loss over the ranks that hold one (every other rank adds 0)."""
    value = torch.zeros((), dtype=torch.float64) if loss is None else loss.detach().to(torch.float64)
    dist.all_reduce(value)
    return value.item() / holders
