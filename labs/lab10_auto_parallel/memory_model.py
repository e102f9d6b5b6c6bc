"""Memory per device under a plan: model states under each ZeRO stage, and activations with and without
checkpointing, for the micro-batch and the 1F1B schedule.

What it answers: does a plan fit in a device's memory, before running it.

Model states (Rajbhandari et al. 2020, arXiv:1910.02054): the device holding the most parameters Ψ (lab 04's
parameters_per_rank over the stages, at tensor-parallel size t) keeps, over its data-parallel group of N,
lab 05's zero_formula(stage, Ψ, N): 2Ψ + 2Ψ + KΨ/N at stage 1, ..., (2 + 2 + K)Ψ/N at stage 3.

Activations of one block and one micro-batch of T = b s tokens, counted on common.model's block (the tensors
autograd saves, sdpa's flash kernel keeping the log-sum-exp; H heads, H_kv' D this rank's K/V width, e bytes):

    a_block = T e (4 C + 2 + (5 C + 4 F + 2 H_kv' D + H) / t)

(the norms' inputs and outputs and the two residual streams are replicated across the tensor-parallel group; q, the
attention output, its reshaped copy, the SwiGLU's three F-wide tensors and its input copy are split), and the
output layer on the last stage keeps T e (3 C + 1 + V / t) plus the int64 tokens and targets (16 T bytes).

Under 1F1B stage s keeps min(p - s, m) micro-batches in flight (Narayanan et al. 2021, Section 2.2); stage 0 keeps
the most. With full checkpointing a block keeps only its input (T C e) and one block's activations are rebuilt at a
time during backward (Chen et al. 2016, arXiv:1604.06174).

Usage:
    memory = memory_per_device(config, plan, workload=workload)
    memory.total <= cluster.memory_bytes
"""

from __future__ import annotations

from dataclasses import dataclass

from common.model import ModelConfig

from .cost_model import ParallelPlan, Workload, stage_layers, stage_parameters


@dataclass(frozen=True)
class MemoryCost:
    """Bytes on the fullest device: parameters, gradients, optimizer state, activations, and their sum."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def block_activation_bytes(config: ModelConfig, *, micro_batch_size: int, seq_len: int, tp: int = 1,
                           activation_bytes: int = 2) -> float:
    """a_block: bytes one block keeps for backward for one micro-batch (the formula above).

    Raises:
        ValueError: from lab 04's kv_head_layout when tp does not divide the heads.
    """
    from lab04_model_parallel.tensor_parallel import kv_head_layout

    kv_per_rank, _ = kv_head_layout(config.num_heads, config.num_kv_heads, tp)
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: block_activation_bytes is not implemented yet (lab10_auto_parallel/memory_model.py)")


def head_activation_bytes(config: ModelConfig, *, micro_batch_size: int, seq_len: int, tp: int = 1,
                          activation_bytes: int = 2) -> float:
    """Bytes the final norm, the output layer and the loss keep for one micro-batch, with the int64 tokens and
    targets."""
    tokens = micro_batch_size * seq_len
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: head_activation_bytes is not implemented yet (lab10_auto_parallel/memory_model.py)")


def activation_memory(config: ModelConfig, plan: ParallelPlan, *, workload: Workload) -> float:
    """Peak activation bytes on the fullest stage: in-flight micro-batches x its blocks' activations (or their inputs
    only, with checkpointing, plus one block rebuilt), and the output layer's on the last stage."""
    b = workload.micro_batch_size(plan)
    common = {"micro_batch_size": b, "seq_len": workload.seq_len, "tp": plan.tp,
              "activation_bytes": workload.activation_bytes}
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: activation_memory is not implemented yet (lab10_auto_parallel/memory_model.py)")


def memory_per_device(config: ModelConfig, plan: ParallelPlan, *, workload: Workload) -> MemoryCost:
    """MemoryCost of the fullest device: model states (zero_formula of the largest stage's parameters over dp) and
    activations (activation_memory)."""
    from lab05_zero.memory import zero_formula

    # TODO (lab10): your code here
    raise NotImplementedError("lab10: memory_per_device is not implemented yet (lab10_auto_parallel/memory_model.py)")
