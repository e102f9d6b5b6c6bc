"""ZeRO-1: optimizer state partitioning (P_os in the paper).

What it saves: the optimizer state, the largest part of a mixed-precision training state. With Adam, every
parameter carries K = 12 bytes beyond its 2-byte bf16 copy and 2-byte gradient: the fp32 master weight, the first
moment m and the second moment v. Data parallelism replicates all of it; ZeRO-1 keeps on each of the N ranks only
the master weights and moments of its own shard (Rajbhandari et al. 2020, arXiv:1910.02054, Section 5.1):

    bytes per rank = 2Ψ (parameters) + 2Ψ (gradients) + KΨ/N (optimizer state)      instead of (2 + 2 + K)Ψ

Algorithm (one step, for each unit's flat buffer of fp32 masters cut into N shards, see flat.py):
1. backward accumulates every gradient into the unit's flat gradient buffer (the parameters' .grad are views of
   it, so autograd adds in place, micro-batch after micro-batch);
2. all-reduce the flat gradient and divide by N: every rank holds the averaged gradient;
3. each rank runs AdamW on its shard only: g = flat_grad[r*S:(r+1)*S], then on its master shard w, m, v
       w <- w - lr*λ*w;  m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) g²
       w <- w - lr/(1-β1^t) * m / (sqrt(v / (1-β2^t)) + ε)                   (Loshchilov & Hutter 2019, Alg. 2)
4. cast the master shard to the in-flight dtype into this rank's slice of the parameters' flat buffer, and
   all-gather the slices so that every rank has every updated parameter; zero the flat gradient.

The communication is that of data parallelism plus one all-gather of the parameters (2Ψ + Ψ in the paper's units,
which a reduce-scatter in place of the all-reduce brings back to 2Ψ: ZeRO-2 does that).

Usage:
    engine = ZeRO1(model, group=dp_group, config=ZeROConfig(stage=1, param_dtype=torch.bfloat16))
    engine.loss(tokens, targets).backward()
    engine.step()
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ZeROConfig
from .flat import FlatGroup, all_gather_flat, shard_module

# -----------------------------------------------------------------------------
# AdamW on one flat shard


@torch.no_grad()
def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               step: int, config: ZeROConfig) -> None:
    """One AdamW update of a flat shard, in place, equal to `torch.optim.AdamW` (non-foreach, non-fused) elementwise.

    Args:
        param: (S,) master weights (fp32), updated in place.
        grad: (S,) the averaged gradient, in param's dtype.
        exp_avg, exp_avg_sq: (S,) Adam's m and v, updated in place.
        step: t, the number of this update (1 for the first).
        config: lr, betas, eps and weight_decay.
    """
    beta1, beta2 = config.betas
    # TODO (lab05): your code here
    raise NotImplementedError("lab05: adamw_step is not implemented yet (lab05_zero/zero1.py)")


class ShardedAdamW:
    """AdamW over this rank's master shards: the K Ψ/N bytes of optimizer state ZeRO partitions.

    Args:
        masters: one (S,) master shard per unit (fp32 for an fp32 model), owned by the optimizer from now on.
        config: the AdamW hyper-parameters.

    Attributes:
        masters, exp_avg, exp_avg_sq: one (S,) tensor per unit each, on the masters' device.
        step_count: t, the number of steps taken.
    """

    offloaded = False

    def __init__(self, masters: Sequence[torch.Tensor], config: ZeROConfig):
        self.config = config
        self.masters = list(masters)
        self.exp_avg = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.masters]
        self.step_count = 0

    def receive(self, index: int, grad: torch.Tensor) -> None:
        """A unit's gradient shard is final for now (offload copies it to the host; here there is nothing to do)."""

    def step(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """AdamW on every shard, with the (S,) averaged gradients in the in-flight dtype; returns the masters."""
        self.step_count += 1
        for master, grad, exp_avg, exp_avg_sq in zip(self.masters, grads, self.exp_avg, self.exp_avg_sq):
            adamw_step(master, grad.to(master.dtype), exp_avg, exp_avg_sq, step=self.step_count, config=self.config)
        return self.masters

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the optimizer state (for memory accounting and checkpoints)."""
        return [*self.masters, *self.exp_avg, *self.exp_avg_sq]


def make_optimizer(masters: Sequence[torch.Tensor], config: ZeROConfig):
    """ShardedAdamW, or offload.OffloadAdamW (state in CPU memory) when config.offload."""
    if config.offload:
        from .offload import OffloadAdamW

        return OffloadAdamW(masters, config)
    return ShardedAdamW(masters, config)


# -----------------------------------------------------------------------------
# The engine


class ZeRO1(nn.Module):
    """ZeRO stage 1: replicated parameters and gradients, partitioned optimizer state.

    Args:
        module: the replica on this rank; its trainable parameters become views of flat buffers (rank 0's values).
        group: the data-parallel process group (None: the default group).
        config: see ZeROConfig (stage is not read here).
        units: the modules whose parameters form one flat buffer each; the rest forms "root".

    Attributes:
        groups: one FlatGroup per unit; `grad` is its (padded_numel,) flat gradient.
        optimizer: ShardedAdamW (or OffloadAdamW) over this rank's master shards.
        events: (kind, detail) log when config.record_events.
    """

    def __init__(self, module: nn.Module, *, group: dist.ProcessGroup | None = None,
                 config: ZeROConfig = ZeROConfig(stage=1), units: Sequence[nn.Module] = ()):
        super().__init__()
        self.module, self.group, self.config = module, group, config
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.events: list[tuple[str, str]] = []
        self.groups: list[FlatGroup]
        # To build: shard_module's groups and masters; each group's flat gradient (zeros, like `full`) with every
        # parameter's .grad a view of it; the optimizer from make_optimizer.
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: ZeRO1.__init__ is not implemented yet (lab05_zero/zero1.py)")

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The wrapped model's loss (common.model.Transformer.loss): scalar fp32."""
        return self.module.loss(tokens, targets)

    @torch.no_grad()
    def step(self) -> None:
        """All-reduce the gradients, AdamW on this rank's shard, all-gather the parameters, zero the gradients."""
        # TODO (lab05): your code here
        raise NotImplementedError("lab05: ZeRO1.step is not implemented yet (lab05_zero/zero1.py)")

    def _log(self, kind: str, detail: str) -> None:
        if self.config.record_events:
            self.events.append((kind, detail))
