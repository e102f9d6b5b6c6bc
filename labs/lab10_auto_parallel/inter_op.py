"""Inter-operator parallelism: slicing the layers into pipeline stages and the cluster into submeshes, by dynamic
programming (Alpa, Zheng et al. 2022, arXiv:2201.12023, Section 5.2, Eqs. 2-5).

What it decides: which contiguous layers form each stage, and which submesh (n nodes x m devices) runs it, so that
the pipeline's step is shortest while every stage fits in memory.

A pipeline of stages with latencies t_1..t_S per micro-batch runs B micro-batches in

    T* = sum_i t_i + (B - 1) max_j t_j                                                          (Alpa's Eq. 2)

For a fixed bound t_max on the slowest stage, F(s, k, d) is the least sum of latencies that slices layers k..L-1
into s stages on d devices, each stage no slower than t_max:

    F(s, k, d) = min over k < i <= L and submeshes (n, m) with n m <= d of
                 t(k..i, (n, m)) + F(s - 1, i, d - n m),       F(0, L, 0) = 0          (Alpa's Eq. 3)

A stage that is the first of s remaining stages keeps s micro-batches in flight under 1F1B (min(s, B)), so its
memory is min(s, B) x the per-micro-batch memory, and it is infeasible above the cap. The answer is the minimum over
s and over t_max (every distinct stage latency) of F(s, 0, N) + (B - 1) t_max. Submeshes are (1, 2^j) inside a
node and (n, M) of whole nodes (Alpa's Section 5.2), and together use all N devices.

Usage:
    best = stage_dp(latency, memory, submeshes=[(1, 1), (1, 2), (1, 4)], num_devices=4, num_microbatches=8,
                    memory_cap=16e9)
    best.latency, best.stages      # [(start, stop, submesh index), ...]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

INF = math.inf


@dataclass(frozen=True)
class StagePlan:
    """latency: T* of the pipeline; stages: (first layer, last layer + 1, submesh index) in order."""

    latency: float
    stages: list[tuple[int, int, int]]


def submesh_shapes(num_nodes: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """Alpa's submesh shapes: (1, 1), (1, 2), (1, 4), ... up to (1, M), then (2, M), ..., (N, M)."""
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: submesh_shapes is not implemented yet (lab10_auto_parallel/inter_op.py)")


def stage_dp(latency: list[list[list[float]]], memory: list[list[list[float]]], *,
             submeshes: list[tuple[int, int]], num_devices: int, num_microbatches: int,
             memory_cap: float) -> StagePlan:
    """The stage slicing and submesh assignment that minimises T* (module docstring).

    Args:
        latency: latency[start][stop][k], seconds per micro-batch of layers [start, stop) on submesh k (entries with
            stop <= start are ignored); L = len(latency).
        memory: memory[start][stop][k], bytes for one micro-batch in flight of those layers on that submesh.
        submeshes: the (n, m) shapes; submesh k has n m devices.
        num_devices: N, the devices the stages must use in total.
        num_microbatches: B >= 1.
        memory_cap: bytes per device.

    Returns:
        The best StagePlan.

    Raises:
        ValueError: B < 1, num_devices < 1, or no slicing fits (the message says so: memory, or devices).
    """
    if num_microbatches < 1 or num_devices < 1:
        raise ValueError(f"stage_dp: need num_microbatches >= 1 and num_devices >= 1, got {num_microbatches} and "
                         f"{num_devices}")
    L, B = len(latency), num_microbatches
    sizes = [n * m for n, m in submeshes]
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: stage_dp is not implemented yet (lab10_auto_parallel/inter_op.py)")


def pipeline_latency(stage_latencies: list[float], num_microbatches: int) -> float:
    """Alpa's Eq. 2: sum of the stage latencies + (B - 1) x the slowest."""
    return sum(stage_latencies) + (num_microbatches - 1) * max(stage_latencies)
