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
        # BEGIN SOLUTION
        self.ep_group = ep_group
        self.ep_size, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        E = layer.config.num_experts
        if E % self.ep_size:
            raise ValueError(f"the number of experts ({E}) must be divisible by the expert-parallel size "
                             f"({self.ep_size})")
        self.num_local = E // self.ep_size
        self.router = layer.router  # replicated: trained data-parallel
        first = self.ep_rank * self.num_local
        self.w_gate_up = nn.Parameter(layer.w_gate_up.detach()[first:first + self.num_local].clone())
        self.w_down = nn.Parameter(layer.w_down.detach()[first:first + self.num_local].clone())
        # END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MoE layer on this rank's tokens, with the experts computed by their owners.

        Args:
            x: (..., C) this rank's tokens (any number, zero included; it may differ between ranks).

        Returns:
            (..., C), equal to the unsharded layer's output on x.
        """
        # BEGIN SOLUTION
        P, E_local = self.ep_size, self.num_local
        if x.dtype != self.w_gate_up.dtype:
            raise TypeError(f"x is {x.dtype} but the layer's parameters are {self.w_gate_up.dtype}: cast one of them")
        tokens = x.reshape(-1, self.width)  # (T, C)
        plan, weights = self.plan(self.router(tokens))
        sent = permute(tokens, plan)  # (A, C), grouped by global expert, so by destination rank too

        # 1-2. exchange the counts: received[s, j] = rows rank s sends to my local expert j
        send_counts = plan.counts.view(P, E_local)  # (P, E/P): row p goes to rank p
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()

        # 3. the rows travel to their experts' owner
        received = AllToAll.apply(sent, recv_splits, send_splits, self.ep_group)  # (R, C), by source rank

        # 4. regroup by local expert (stable: source rank order within an expert), run the experts, undo
        local_expert = torch.arange(E_local, device=x.device).repeat(P).repeat_interleave(recv_counts.reshape(-1))
        order = torch.argsort(local_expert, stable=True)
        local_offsets = torch.zeros(E_local + 1, dtype=torch.int64, device=x.device)
        local_offsets[1:] = recv_counts.sum(0).cumsum(0)
        computed = expert_mlp(received.index_select(0, order), local_offsets, self.w_gate_up, self.w_down,
                              backend=self.config.backend)
        back = computed.index_select(0, torch.argsort(order))  # by source rank again

        # 5. the results return to the ranks that sent the rows; 6. combine locally
        returned = AllToAll.apply(back, send_splits, recv_splits, self.ep_group)  # (A, C), the order of `sent`
        return unpermute(returned, plan, weights, tokens.shape[0]).reshape(x.shape)
        # END SOLUTION


# -----------------------------------------------------------------------------
# Public entry points


def apply_expert_parallel(model: nn.Module, *, ep_group: dist.ProcessGroup) -> nn.Module:
    """Replace every MoELayer in `model` (in place) with an ExpertParallelMoE over `ep_group`; returns `model`.

    Raises:
        ValueError: a layer whose number of experts the group's size does not divide (raised on every rank).
    """
    # BEGIN SOLUTION
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoELayer) and not isinstance(child, ExpertParallelMoE):
                setattr(module, child_name, ExpertParallelMoE(child, ep_group=ep_group))
    return model
    # END SOLUTION


def sync_gradients(model: nn.Module, *, group: dist.ProcessGroup) -> None:
    """Data parallelism around expert parallelism: after backward of each rank's mean loss, make every gradient the
    gradient of the mean over ranks.

    Replicated parameters: all_reduce(sum) / P. Expert shards (ExpertParallelMoE.w_gate_up / w_down): / P, no
    communication. A parameter without a gradient is left alone.
    """
    # BEGIN SOLUTION
    ranks = dist.get_world_size(group)
    shards = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in (m.w_gate_up, m.w_down)}
    for param in model.parameters():
        if param.grad is None:
            continue
        if id(param) not in shards:  # replicated: sum the ranks' gradients first
            dist.all_reduce(param.grad, group=group)
        param.grad.div_(ranks)
    # END SOLUTION


# -----------------------------------------------------------------------------
# The differentiable all-to-all


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends the gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        # BEGIN SOLUTION
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # BEGIN SOLUTION
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None
        # END SOLUTION


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
