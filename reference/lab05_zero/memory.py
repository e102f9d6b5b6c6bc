"""Memory accounting: the bytes each rank holds, counted, against the ZeRO paper's formulas.

What it measures: the model states a rank keeps between steps. Rajbhandari et al. 2020 (arXiv:1910.02054, Section
5, Figure 1) count, for Ψ parameters on N data-parallel ranks with 2-byte parameters and gradients in flight and K
bytes of optimizer state per parameter (K = 12 for mixed-precision Adam: fp32 master, m, v):

    baseline (data parallel)   (2 + 2 + K) Ψ
    ZeRO-1 (P_os)              2Ψ + 2Ψ + KΨ/N
    ZeRO-2 (P_os+g)            2Ψ + (2 + K)Ψ/N
    ZeRO-3 (P_os+g+p)          (2 + 2 + K)Ψ/N

With ZeRO-Offload (Ren et al. 2021, arXiv:2101.06840) the KΨ/N of optimizer state moves to the host, with the 2Ψ/N
gradient shard copied there for the CPU step. The formulas are exact when Ψ is the *padded* parameter count (each
unit's flat buffer rounded up to a multiple of N, see flat.py); with the raw count they are within padding.

Counting is exact on any device: a tensor's memory is its storage (`untyped_storage().nbytes()`), and views share
their base's storage, so the bytes a set of tensors holds is the sum over their *distinct* storages. A storage that
ZeRO-3 has freed (resized to 0) counts 0. Frozen parameters and buffers are not model states of the formula and are
not counted.

Usage:
    formula = zero_formula(stage=2, num_params=padded, world_size=4)
    measured = measure_memory(engine)
    measured.params, measured.grads, measured.optimizer, measured.host
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class MemoryBytes:
    """Bytes of model states on one rank: on the device by kind, and on the host (offloaded state)."""

    params: float
    grads: float
    optimizer: float
    host: float = 0.0

    @property
    def device(self) -> float:
        return self.params + self.grads + self.optimizer


# -----------------------------------------------------------------------------
# The paper's formulas


def zero_formula(stage: int, num_params: int, world_size: int, *, param_bytes: int = 2, grad_bytes: int = 2,
                 optimizer_bytes: int = 12, offload: bool = False) -> MemoryBytes:
    """Bytes per rank of the model states of ZeRO `stage` (0: plain data parallelism).

    Args:
        stage: 0, 1, 2 or 3.
        num_params: Ψ (padded, for exact figures).
        world_size: N >= 1.
        param_bytes, grad_bytes: bytes per in-flight parameter and gradient element (2 for bf16/fp16).
        optimizer_bytes: K, bytes of optimizer state per parameter (12 for an fp32 master, m and v).
        offload: the optimizer state, and a copy of the gradient shard, live on the host.

    Returns:
        MemoryBytes(params, grads, optimizer, host); e.g. stage 2, Ψ=100, N=4: (200, 50, 300, 0).

    Raises:
        ValueError: a stage outside 0-3, num_params < 0, world_size < 1, or offload at stage 0.
    """
    # BEGIN SOLUTION
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_formula: stage must be 0, 1, 2 or 3, got {stage}")
    if num_params < 0 or world_size < 1:
        raise ValueError(f"zero_formula: need num_params >= 0 and world_size >= 1, got {num_params} and {world_size}")
    if offload and stage == 0:
        raise ValueError("zero_formula: offload needs the optimizer state partitioned (stage >= 1)")
    per_rank = num_params / world_size
    params = param_bytes * (per_rank if stage >= 3 else num_params)
    grads = grad_bytes * (per_rank if stage >= 2 else num_params)
    optimizer = optimizer_bytes * (per_rank if stage >= 1 else num_params)
    if offload:
        return MemoryBytes(params=params, grads=grads, optimizer=0.0, host=optimizer + grad_bytes * per_rank)
    return MemoryBytes(params=params, grads=grads, optimizer=optimizer)
    # END SOLUTION


# -----------------------------------------------------------------------------
# Counting what a rank holds


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (None entries are skipped; a view counts its whole base)."""
    # BEGIN SOLUTION
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            continue  # freed (ZeRO-3 between uses), or empty
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
    # END SOLUTION


def measure_memory(engine: nn.Module) -> MemoryBytes:
    """Count the model states an engine (ZeRO1, ZeRO2 or ZeRO3) holds on this rank now.

    params: the trainable parameters' storages and the parameter shards; grads: the parameters' .grad and the
    groups' gradient buffers; optimizer: the optimizer's state tensors, counted under `host` instead when the
    optimizer is offloaded, together with its host gradient copies.
    """
    params = [p for g in engine.groups for p in g.params]
    # BEGIN SOLUTION
    optimizer = engine.optimizer
    param_bytes = storage_bytes([*params, *(g.shard for g in engine.groups)])
    grad_bytes = storage_bytes([*(p.grad for p in params), *(g.grad for g in engine.groups)])
    state_bytes = storage_bytes(optimizer.state_tensors())
    if optimizer.offloaded:
        return MemoryBytes(params=param_bytes, grads=grad_bytes, optimizer=0,
                           host=state_bytes + storage_bytes(optimizer.host_grads))
    return MemoryBytes(params=param_bytes, grads=grad_bytes, optimizer=state_bytes)
    # END SOLUTION


def padded_num_params(engine: nn.Module) -> int:
    """Ψ as the formulas count it exactly: the sum of the units' padded flat sizes."""
    return sum(g.layout.padded_numel for g in engine.groups)
