"""The cost model of one training step under a plan dp x tp x pp, m micro-batches, a ZeRO stage and checkpointing.

What it answers: how long a step takes on a cluster, from FLOPs and the alpha-beta cost of every collective
(collectives.py), without running anything. Memory is memory_model.py's.

Compute (Narayanan et al. 2021, arXiv:2104.04473, Section 5.1, written for common.model's Llama block): one block's
forward on T = b s tokens (H_kv D = K/V width, F the FFN width) costs

    2 T (2 C^2 + 2 C H_kv D + 3 C F)  +  4 b s^2 C       (the six GEMMs, then q k^T and attention x v)

and the output layer 2 T C V. A backward costs twice the forward; full activation checkpointing runs the blocks'
forward once more (4x instead of 3x). A device does 1/t of it at its achievable FLOP/s, plus a fixed overhead per
block and micro-batch (kernel launches; it dominates tiny models on a CPU).

Communication per micro-batch on the slowest stage (b tokens-per-micro-batch activations A = b s C bytes):
    tensor parallel   4 all-reduces of A per block (2 forward, 2 backward; Shoeybi et al. 2019, arXiv:1909.08053),
                      6 with checkpointing (the recomputed forward repeats its 2)
    pipeline          2 point-to-point messages of A (the activation forward, its gradient backward)
Per step, over the data-parallel group (Rajbhandari et al. 2020, arXiv:1910.02054, Section 7):
    ZeRO 0            all-reduce of the gradients (G bytes of the largest stage)
    ZeRO 1, 2         reduce-scatter of the gradients + all-gather of the parameters (the same volume)
    ZeRO 3            per micro-batch: all-gather of the parameters in forward and in backward + reduce-scatter

The 1F1B pipeline (GPipe's makespan, PipeDream-Flush's memory) takes (m + p - 1) micro-batch slots of the slowest
stage, so the bubble is (p-1)/(m+p-1) of it; the data-parallel synchronisation follows, not overlapped.

Usage:
    plan = ParallelPlan(dp=2, tp=4, pp=2, num_microbatches=8, zero_stage=1)
    cost = step_time(config, plan, workload=Workload(global_batch=64, seq_len=2048), cluster=cluster)
    cost.total, cost.bubble, cost.tp_comm
"""

from __future__ import annotations

from dataclasses import dataclass

from common.model import ModelConfig

from .collectives import collective_time
from .profiles import ClusterProfile

# -----------------------------------------------------------------------------
# Config: the plan and the workload


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """dp x tp x pp devices; num_microbatches m per step (per data-parallel replica); zero_stage 0-3 over the
    data-parallel group; checkpointing: full activation recomputation of every block."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    num_microbatches: int = 1
    zero_stage: int = 0
    checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelPlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"ParallelPlan.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def describe(self) -> str:
        """A short name: "dp2 tp2 pp1 m1 zero1" (+ " ckpt")."""
        return (f"dp{self.dp} tp{self.tp} pp{self.pp} m{self.num_microbatches} zero{self.zero_stage}"
                + (" ckpt" if self.checkpointing else ""))


@dataclass(frozen=True, kw_only=True)
class Workload:
    """global_batch sequences of seq_len tokens per step; bytes per element of parameters, gradients and
    activations in flight, and of optimizer state per parameter (12: fp32 master, Adam's m and v)."""

    global_batch: int
    seq_len: int
    param_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12
    activation_bytes: int = 2

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.seq_len < 1:
            raise ValueError(f"Workload needs global_batch >= 1 and seq_len >= 1, got {self.global_batch} and "
                             f"{self.seq_len}")

    def micro_batch_size(self, plan: ParallelPlan) -> int:
        """b = global_batch / (dp m). Raises ValueError when dp m does not divide the global batch."""
        if self.global_batch % (plan.dp * plan.num_microbatches):
            raise ValueError(f"global batch {self.global_batch} is not divisible by dp ({plan.dp}) x "
                             f"num_microbatches ({plan.num_microbatches})")
        return self.global_batch // (plan.dp * plan.num_microbatches)


@dataclass(frozen=True)
class StepCost:
    """Seconds of one step: compute and each kind of communication on the critical path, the bubble, the total."""

    compute: float
    tp_comm: float
    pp_comm: float
    dp_comm: float
    bubble: float
    total: float


# -----------------------------------------------------------------------------
# FLOPs


def layer_flops(config: ModelConfig, *, batch_size: int, seq_len: int) -> float:
    """Forward FLOPs of one block of `config` on batch_size sequences of seq_len tokens (the formula above)."""
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: layer_flops is not implemented yet (lab10_auto_parallel/cost_model.py)")


def head_flops(config: ModelConfig, *, batch_size: int, seq_len: int) -> float:
    """Forward FLOPs of the output layer: 2 T C V."""
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: head_flops is not implemented yet (lab10_auto_parallel/cost_model.py)")


def model_flops_per_step(config: ModelConfig, *, global_batch: int, seq_len: int) -> float:
    """FLOPs of one step without recomputation (3x the forward): the "model FLOPs" that throughput is reported in."""
    forward = (config.num_layers * layer_flops(config, batch_size=global_batch, seq_len=seq_len)
               + head_flops(config, batch_size=global_batch, seq_len=seq_len))
    return 3 * forward


# -----------------------------------------------------------------------------
# The step


def stage_layers(num_layers: int, pp: int) -> int:
    """Blocks on the largest pipeline stage (lab 04's partition: sizes differ by at most one)."""
    return -(-num_layers // pp)


def step_time(config: ModelConfig, plan: ParallelPlan, *, workload: Workload, cluster: ClusterProfile) -> StepCost:
    """The predicted StepCost of one training step of `config` under `plan` on `cluster`.

    Stage compute per micro-batch: the largest stage's blocks, (3 or 4) x their forward FLOPs / tp / achievable FLOP/s
    plus layer_overhead_s each, and the output layer's 3x on the last stage when it is that stage (pp = 1), or
    the larger of the two otherwise. TP all-reduces run on the tp group (stride 1), P2P on the pp group (stride tp),
    data-parallel collectives on the dp group (stride tp pp), all through collective_time.

    Raises:
        ValueError: dp m does not divide the global batch; pp > num_layers.
    """
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: step_time is not implemented yet (lab10_auto_parallel/cost_model.py)")


def stage_parameters(config: ModelConfig, *, tp: int, pp: int) -> int:
    """Parameters on the device that holds the most of them (lab 04's parameters_per_rank, maximised over stages)."""
    from lab04_model_parallel.arithmetic import parameters_per_rank

    return max(parameters_per_rank(config, tp=tp, pp=pp, stage=stage) for stage in range(pp))


def _dp_time(config: ModelConfig, plan: ParallelPlan, workload: Workload, cluster: ClusterProfile) -> float:
    """Seconds of the data-parallel synchronisation of one step (the table in the module docstring)."""
    if plan.dp == 1:
        return 0.0
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: _dp_time is not implemented yet (lab10_auto_parallel/cost_model.py)")
