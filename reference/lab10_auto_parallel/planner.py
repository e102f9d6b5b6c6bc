"""The planner: the fastest plan dp x tp x pp, micro-batches, ZeRO stage and checkpointing that fits in memory.

What it answers: given a model (common.model's config), a cluster profile, a global batch and a memory cap, which
3-D parallel configuration to train with, how long its step should take and how much memory it needs, and why every
other configuration lost (Narayanan et al. 2021, arXiv:2104.04473, Section 3, give the rules this search rediscovers:
tp inside a node, pp across nodes, dp for the rest; Alpa, arXiv:2201.12023, searches the same space automatically).

The search is exhaustive over the grid, each point priced by cost_model.step_time and memory_model.memory_per_device:

    dp tp pp = N devices      tp divides the heads (and lab 04's K/V rule), the FFN width and the vocabulary;
                              tp <= devices per node; pp divides the layers; dp divides the global batch
    m                         divides the per-replica batch (pp = 1: gradient accumulation)
    zero_stage                0-3 with dp > 1 (0 only when dp = 1); 0-1 with pp > 1 (ZeRO-2/3 would reduce-scatter
                              every micro-batch's gradients: Megatron-LM and DeepSpeed refuse the pair)
    checkpointing             off / on

Feasible plans are ranked by predicted step time; every other plan is kept with the reason it lost. A request no plan
can meet raises ValueError saying why: nothing fits even fully sharded (the smallest memory of any plan, against the
cap), or no degree divides the model.

Usage:
    result = plan_training(config, cluster, workload=Workload(global_batch=512, seq_len=2048), memory_cap=80e9)
    result.best.describe(), result.cost.total, result.memory.total
    for row in result.table()[:10]: print(row)
"""

from __future__ import annotations

from dataclasses import dataclass

from common.model import ModelConfig

from .cost_model import ParallelPlan, StepCost, Workload, model_flops_per_step, step_time
from .memory_model import MemoryCost, memory_per_device
from .profiles import ClusterProfile

MAX_MICROBATCHES = 512


@dataclass(frozen=True)
class Candidate:
    """A plan with its predicted cost and memory (None when it was refused before pricing) and why it lost ("" for
    the best)."""

    plan: ParallelPlan
    cost: StepCost | None
    memory: MemoryCost | None
    reason: str


@dataclass(frozen=True)
class PlanResult:
    """The best plan, its cost and memory, FLOP/s per device, and every other candidate, best first."""

    best: ParallelPlan
    cost: StepCost
    memory: MemoryCost
    flops_per_device: float
    rejected: list[Candidate]

    def table(self) -> list[dict]:
        """One row per candidate (the best first): plan, predicted seconds, memory GB, reason."""
        rows = [Candidate(self.best, self.cost, self.memory, "")] + self.rejected
        return [{"plan": c.plan.describe(), "step_s": None if c.cost is None else c.cost.total,
                 "memory_gb": None if c.memory is None else c.memory.total / 1e9, "reason": c.reason or "best"}
                for c in rows]


def degree_problem(config: ModelConfig, *, tp: int, pp: int) -> str:
    """Why tensor-parallel size tp or pipeline size pp cannot split `config` ("" when both can)."""
    from lab04_model_parallel.tensor_parallel import kv_head_layout

    # BEGIN SOLUTION
    if config.num_heads % tp:
        return f"tp {tp} does not divide num_heads {config.num_heads}"
    try:
        kv_head_layout(config.num_heads, config.num_kv_heads, tp_size=tp)
    except ValueError as error:
        return f"tp {tp}: {error}"
    for name, size in (("the FFN width", config.hidden_width), ("vocab_size", config.vocab_size)):
        if size % tp:
            return f"tp {tp} does not divide {name} {size}"
    if config.num_layers % pp:
        return f"pp {pp} does not divide num_layers {config.num_layers}"
    if pp > 1 and config.tie_embeddings:
        return f"pp {pp}: tied embeddings cannot be split across pipeline stages"
    return ""
    # END SOLUTION


def candidate_plans(config: ModelConfig, *, num_devices: int, workload: Workload,
                    gpus_per_node: int) -> tuple[list[ParallelPlan], list[Candidate]]:
    """(plans to price, plans refused with a reason) over the grid of the module docstring."""
    to_price, refused = [], []
    # BEGIN SOLUTION
    for tp in _divisors(num_devices):
        for pp in _divisors(num_devices // tp):
            dp = num_devices // (tp * pp)
            shape = ParallelPlan(dp=dp, tp=tp, pp=pp)
            reason = degree_problem(config, tp=tp, pp=pp)
            if not reason and tp > gpus_per_node:
                reason = f"tp {tp} spans nodes of {gpus_per_node} devices"
            if not reason and workload.global_batch % dp:
                reason = f"dp {dp} does not divide the global batch {workload.global_batch}"
            if reason:
                refused.append(Candidate(shape, None, None, reason))
                continue
            per_replica = workload.global_batch // dp
            for m in (m for m in _divisors(per_replica) if m <= MAX_MICROBATCHES):
                for zero in ((0,) if dp == 1 else (0, 1) if pp > 1 else (0, 1, 2, 3)):
                    for checkpointing in (False, True):
                        to_price.append(ParallelPlan(dp=dp, tp=tp, pp=pp, num_microbatches=m, zero_stage=zero,
                                                     checkpointing=checkpointing))
    # END SOLUTION
    return to_price, refused


def plan_training(config: ModelConfig, cluster: ClusterProfile, *, workload: Workload,
                  memory_cap: float | None = None, num_devices: int | None = None) -> PlanResult:
    """The fastest plan for `config` on `num_devices` devices of `cluster` under `memory_cap` bytes per device.

    Args:
        config: the model.
        cluster: device and network profile (profiles.load_profile).
        workload: global batch, sequence length and bytes per element.
        memory_cap: bytes per device (default: the profile's memory).
        num_devices: devices to use (default: the whole cluster); whole nodes, or part of one.

    Returns:
        PlanResult with the best plan and every rejected candidate, ranked: feasible ones by step time, then those
        over the memory cap by memory, then those refused by a degree.

    Raises:
        ValueError: no plan fits even fully sharded (naming the smallest memory found and the cap), or no degree
            divides the model (naming one reason), or a bad num_devices.
    """
    cap = cluster.memory_bytes if memory_cap is None else memory_cap
    devices = cluster.num_devices if num_devices is None else num_devices
    cluster = cluster.with_devices(devices)
    to_price, refused = candidate_plans(config, num_devices=devices, workload=workload,
                                        gpus_per_node=cluster.gpus_per_node)
    # BEGIN SOLUTION
    if not to_price:
        reasons = "; ".join(sorted({c.reason for c in refused}))
        raise ValueError(f"plan_training: no plan for {devices} devices: no degree divides the model ({reasons})")
    fits, too_big = [], []
    for plan in to_price:
        memory = memory_per_device(config, plan, workload=workload)
        if memory.total > cap:
            too_big.append(Candidate(plan, None, memory,
                                     f"needs {memory.total / 1e9:.3g} GB per device > cap {cap / 1e9:.3g} GB"))
        else:
            fits.append(Candidate(plan, step_time(config, plan, workload=workload, cluster=cluster), memory, ""))
    if not fits:
        smallest = min(too_big, key=lambda c: c.memory.total)
        raise ValueError(f"plan_training: does not fit even fully sharded: the smallest memory per device is "
                         f"{smallest.memory.total / 1e9:.3g} GB ({smallest.plan.describe()}) > cap "
                         f"{cap / 1e9:.3g} GB on {devices} devices")
    fits.sort(key=lambda c: c.cost.total)
    too_big.sort(key=lambda c: c.memory.total)
    best = fits[0]
    slower = [Candidate(c.plan, c.cost, c.memory, f"slower: {c.cost.total:.4g} s vs {best.cost.total:.4g} s "
                                                  f"(x{c.cost.total / best.cost.total:.2f})") for c in fits[1:]]
    flops = model_flops_per_step(config, global_batch=workload.global_batch, seq_len=workload.seq_len)
    if best.plan.checkpointing:
        flops *= 4 / 3  # the recomputed forward is executed work too (Megatron-LM's Eq. 3 counts it)
    return PlanResult(best=best.plan, cost=best.cost, memory=best.memory,
                      flops_per_device=flops / best.cost.total / devices, rejected=slower + too_big + refused)
    # END SOLUTION


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
