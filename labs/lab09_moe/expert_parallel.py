"""Expert parallelism: the experts are sharded across ranks, and tokens travel to their expert's owner and back.

What it saves: memory per GPU. With P ranks, each holds E / P of the experts (rank r owns experts
[r E/P, (r+1) E/P), in order), so the expert weights, their gradients and their optimizer state shrink P-fold, while
the non-expert parameters (attention, norms, embeddings, the routers) stay replicated and train data-parallel. The
price is two all-to-alls per MoE layer in forward (and two in backward). GShard (Lepikhin et al. 2020,
arXiv:2006.16668, Section 3.2) and Switch (Fedus et al. 2021, Section 5.3); Megatron Core's "alltoall" dispatcher.

One forward on rank r, with T_r local tokens:

    1. route locally and sort the k T_r assignments by global expert              counts (E,) -> (P, E/P)
    2. all_to_all_single(counts): rank r learns how many rows each rank sends to each of its experts
    3. all_to_all_single(rows, output_split_sizes=recv, input_split_sizes=send)   rows arrive grouped by source rank
    4. re-sort the received rows by local expert, run the grouped experts, undo the re-sort
    5. all_to_all_single back, with the splits swapped: each row returns to the rank it came from
    6. combine with the router weights locally (dispatch.unpermute)

The all-to-all is differentiable: its backward is the all-to-all with the splits swapped (`AllToAll`). So the
gradient of an expert's weights, on its owner, collects the contributions of every rank's tokens.

Gradients for data parallelism (`sync_gradients`), with the loss L = 1/P sum_r L_r (each rank's mean loss):
- a replicated parameter: its gradient on rank r is dL_r/dθ, so average over ranks: all_reduce(sum) / P;
- an expert's weights: the owner already holds sum_r dL_r/dW (step 5's backward brought every rank's share), so divide
  by P and communicate nothing.

Usage (inside a process group, e.g. a worker of common.launch.run_distributed; the EP axis is the mesh's dp axis):
    mesh = build_mesh(dp=world_size)
    model = apply_expert_parallel(apply_moe(model, config=config), ep_group=mesh.dp_group)
    model.loss(tokens, targets).backward()
    sync_gradients(model, group=mesh.dp_group)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .dispatch import make_dispatch, permute, unpermute
from .grouped_gemm import expert_mlp
from .moe_layer import MoELayer

# -----------------------------------------------------------------------------
# The expert-parallel layer


class ExpertParallelMoE(MoELayer):
    """An MoELayer whose experts are sharded over `ep_group`; the router stays replicated.

    Its parameters have the unsharded layer's names: router.weight (E, C) replicated, w_gate_up (E/P, C, 2F) and
    w_down (E/P, F, C) holding this rank's experts [r E/P, (r+1) E/P). Routing, the losses and the counts are the
    MoELayer's (`plan`), computed on this rank's tokens.
    """

    def __init__(self, layer: MoELayer, *, ep_group: dist.ProcessGroup):
        """Take this rank's shard of `layer`'s experts (copies) and share its router module.

        Raises:
            ValueError: the number of experts is not divisible by the expert-parallel size.
        """
        nn.Module.__init__(self)  # not MoELayer.__init__, which would allocate all E experts again
        self.width, self.config = layer.width, layer.config
        self.aux_loss = self.z_loss = self.counts = None
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: ExpertParallelMoE.__init__ is not implemented yet (lab09_moe/expert_parallel.py)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MoE layer on this rank's tokens, with the experts computed by their owners.

        Args:
            x: (..., C) this rank's tokens (any number, zero included; it may differ between ranks).

        Returns:
            (..., C), equal to the unsharded layer's output on x.
        """
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: ExpertParallelMoE.forward is not implemented yet (lab09_moe/expert_parallel.py)")


# -----------------------------------------------------------------------------
# Public entry points


def apply_expert_parallel(model: nn.Module, *, ep_group: dist.ProcessGroup) -> nn.Module:
    """Replace every MoELayer in `model` (in place) with an ExpertParallelMoE over `ep_group`; returns `model`.

    Raises:
        ValueError: a layer whose number of experts the group's size does not divide (raised on every rank).
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: apply_expert_parallel is not implemented yet (lab09_moe/expert_parallel.py)")


def sync_gradients(model: nn.Module, *, group: dist.ProcessGroup) -> None:
    """Data parallelism around expert parallelism: after backward of each rank's mean loss, make every gradient the
    gradient of the mean over ranks.

    Replicated parameters: all_reduce(sum) / P. Expert shards (ExpertParallelMoE.w_gate_up / w_down): / P, no
    communication. A parameter without a gradient is left alone.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: sync_gradients is not implemented yet (lab09_moe/expert_parallel.py)")


# -----------------------------------------------------------------------------
# The differentiable all-to-all


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: AllToAll.forward is not implemented yet (lab09_moe/expert_parallel.py)")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: AllToAll.backward is not implemented yet (lab09_moe/expert_parallel.py)")


# -----------------------------------------------------------------------------
# Demo (given): one rank of the notebook's comparison with the unsharded layer


def demo_rank(info, state: dict, xs: list[torch.Tensor], config: dict) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Rank `info.rank` of `common.launch.run_distributed(demo_rank, world_size=P, args=(state, xs, config))`:
    the expert-parallel layer (over the mesh's dp axis) on this rank's tokens xs[rank]; returns (output, the shape of
    this rank's w_gate_up shard)."""
    from common.mesh import build_mesh

    from .moe_layer import MoEConfig

    layer = MoELayer(xs[0].shape[-1], MoEConfig(**config))
    layer.load_state_dict(state)
    sharded = ExpertParallelMoE(layer, ep_group=build_mesh(dp=info.world_size).dp_group)
    with torch.no_grad():
        return sharded(xs[info.rank]), tuple(sharded.w_gate_up.shape)
