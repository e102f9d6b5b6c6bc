"""The lab's configuration and its entry point, `apply_zero`.

One config serves the three ZeRO stages (Rajbhandari et al. 2020, arXiv:1910.02054, Section 5), ZeRO-Offload
(Ren et al. 2021, arXiv:2101.06840) and mixed precision:

    stage 1   optimizer state (fp32 master weights, Adam's m and v) partitioned    2Ψ + 2Ψ + KΨ/N bytes a rank
    stage 2   ... and gradients, reduce-scattered during backward                2Ψ + (2 + K)Ψ/N
    stage 3   ... and parameters, gathered around each unit's forward/backward   (2 + 2 + K)Ψ/N
    offload   the optimizer state and its step live in CPU memory                K Ψ/N on the host instead

with Ψ parameters, N ranks, 2-byte (bf16/fp16) parameters and gradients in flight, and K = 12 bytes of optimizer
state per parameter (fp32 master, m, v).

Usage:
    engine = apply_zero(model, group=mesh.dp_group, config=ZeROConfig(stage=3, param_dtype=torch.bfloat16))
    engine.loss(tokens, targets).backward()
    engine.step()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

IN_FLIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True, kw_only=True)
class ZeROConfig:
    """stage: 1, 2 or 3. param_dtype: dtype of parameters and gradients in flight (None: the model's own; the master
    shards keep the model's dtype, fp32 for an fp32 model). lr, betas, eps, weight_decay: AdamW's (Loshchilov &
    Hutter 2019), decoupled weight decay. offload: master weights and optimizer state on the CPU (ZeRO-Offload).
    prefetch: ZeRO-3 all-gathers the next unit while the current one computes. record_events: keep an event log
    (`engine.events`) of gathers, frees, reduce-scatters and copies, for tests and plots."""

    stage: int = 1
    param_dtype: torch.dtype | None = None
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    offload: bool = False
    prefetch: bool = True
    record_events: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"ZeROConfig.stage must be 1, 2 or 3, got {self.stage}")
        if self.param_dtype is not None and self.param_dtype not in IN_FLIGHT_DTYPES:
            raise ValueError(f"ZeROConfig.param_dtype must be one of {IN_FLIGHT_DTYPES} or None, "
                             f"got {self.param_dtype}")
        if not self.lr > 0:
            raise ValueError(f"ZeROConfig.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"ZeROConfig.betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"ZeROConfig.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"ZeROConfig.weight_decay must be >= 0, got {self.weight_decay}")


def default_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (`model.blocks`) when the model has them; otherwise no units (one root unit)."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def apply_zero(model: nn.Module, *, group: dist.ProcessGroup | None = None, config: ZeROConfig = ZeROConfig(),
               units: Sequence[nn.Module] | None = None) -> nn.Module:
    """Wrap `model` (on this rank's device, the same structure on every rank) in the engine of `config.stage`.

    Args:
        model: the replica on this rank; its parameters become views of flat buffers (rank 0's values).
        group: the data-parallel process group (None: the default group), e.g. `build_mesh(dp=N).dp_group`.
        config: the stage and its options.
        units: the modules that form units (default: `model.blocks`); the remaining parameters form "root".

    Returns:
        A ZeRO1, ZeRO2 or ZeRO3 engine: `engine.loss(tokens, targets)` / `engine(tokens)`, `backward()`, then
        `engine.step()`.
    """
    from .zero1 import ZeRO1
    from .zero2 import ZeRO2
    from .zero3 import ZeRO3

    engine = {1: ZeRO1, 2: ZeRO2, 3: ZeRO3}[config.stage]
    return engine(model, group=group, config=config, units=default_units(model) if units is None else units)
