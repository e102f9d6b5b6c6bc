"""ZeRO-2: gradient partitioning (P_os+g), reduce-scattered in buckets while backward runs.

What it saves: the gradients. After ZeRO-1 a rank still holds the whole averaged gradient, although it updates only
its shard. ZeRO-2 reduce-scatters each unit's gradient as soon as backward has produced it, so a rank keeps just
the 1/N it owns (Rajbhandari et al. 2020, arXiv:1910.02054, Section 5.2):

    bytes per rank = 2Ψ (parameters) + (2 + K)Ψ/N (gradient shard and optimizer state)

and the reduce-scatter costs half an all-reduce, so the step moves no more bytes than data parallelism.

Algorithm (bucketed as in lab 03's DDP; here a bucket is one unit's flat buffer, so its reduce-scatter output is
exactly the owner's gradient shard):
1. a post-accumulate-grad hook on every trainable parameter copies its fresh .grad into its unit's staging buffer
   (a (padded_numel,) flat gradient, allocated when the unit's first gradient arrives) and drops the .grad;
2. when a unit's last gradient has arrived, its reduce-scatter is launched asynchronously, units strictly in their
   backward order (the blocks from last to first, then root): every rank must issue the same collectives in the
   same order. Before a launch, the earlier launches are waited for: each result, divided by N, is added to the
   unit's gradient shard and its staging buffer is freed, so at most about two units' flat gradients are alive;
3. at the end of backward (a callback queued on autograd's engine), units with parameters that got no gradient
   are launched with zeros there, and everything is waited for. No rank then holds a full gradient.

Several backward passes before `step()` add their averaged gradients into the shards (gradient accumulation).
`step()` runs AdamW on each shard and all-gathers the updated parameters, as ZeRO-1 does.

Usage:
    engine = ZeRO2(model, group=dp_group, config=ZeROConfig(stage=2, param_dtype=torch.bfloat16))
    engine.loss(tokens, targets).backward()          # gradients are reduce-scattered during this call
    engine.step()
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ZeROConfig
from .flat import FlatGroup, all_gather_flat, reduce_scatter_flat, shard_module
from .zero1 import make_optimizer

# -----------------------------------------------------------------------------
# Reduce-scatter of gradients during backward


@dataclass
class _Pending:
    """A unit's gradient on its way to the shard during one backward."""

    staging: torch.Tensor | None = None  # (padded_numel,) this rank's flat gradient of the unit
    filled: set[int] = field(default_factory=set)  # indices of the unit's parameters already copied in
    output: torch.Tensor | None = None  # (shard_numel,) the reduce-scatter's result
    work: dist.Work | None = None  # the async reduce-scatter, once launched


class GradientReducer:
    """Reduce-scatters every unit's gradient into its (shard_numel,) `FlatGroup.grad` while backward runs.

    Args:
        groups: the units; each group's `grad` is its gradient shard (zeros, the in-flight dtype).
        group: the data-parallel process group.
        on_complete: called with a unit's index once all its parameters' gradients are in (ZeRO-3 frees the
            unit's gathered parameters there).
        on_reduced: called with (unit index, its gradient shard) each time a reduce-scatter has been added into the
            shard (ZeRO-Offload starts the copy to the host there).
        log: called with (kind, detail) for the event log.

    Attributes:
        order: the unit indices in launch order: units from last to first, then "root".
    """

    def __init__(self, groups: Sequence[FlatGroup], *, group: dist.ProcessGroup | None,
                 on_complete: Callable[[int], None] | None = None,
                 on_reduced: Callable[[int, torch.Tensor], None] | None = None,
                 log: Callable[[str, str], None] | None = None):
        self.groups, self.group = list(groups), group
        self.world_size = dist.get_world_size(group)
        self.on_complete, self.on_reduced = on_complete, on_reduced
        self.log = log or (lambda kind, detail: None)
        units = [index for index, g in enumerate(self.groups) if g.name != "root"]
        self.order = units[::-1] + [index for index, g in enumerate(self.groups) if g.name == "root"]
        self.pending = [_Pending() for _ in self.groups]
        self._launched: list[int] = []  # launched and not yet waited for
        self._next = 0  # position in self.order of the next unit to launch
        self._in_backward = False
        # autograd holds the hooks from C++, out of the garbage collector's sight: a hook holding the reducer would
        # keep it, its engine and every buffer alive for ever, so hooks reach it through a weak reference
        reducer = weakref.ref(self)
        for group_index, flat_group in enumerate(self.groups):
            for param_index, param in enumerate(flat_group.params):
                param.register_post_accumulate_grad_hook(_grad_hook(reducer, group_index, param_index))

    @torch.no_grad()
    def _on_grad_ready(self, group_index: int, param_index: int, param: torch.Tensor) -> None:
        """Autograd's hook: `param.grad` is final for this backward."""
        if not self._in_backward:  # the first gradient of this backward: finish when backward ends
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        flat_group, pending = self.groups[group_index], self.pending[group_index]
        # BEGIN SOLUTION
        if pending.staging is None:
            pending.staging = torch.zeros_like(flat_group.full, device=param.grad.device)
        offset = flat_group.layout.offsets[param_index]
        pending.staging[offset: offset + param.numel()].copy_(param.grad.reshape(-1))
        param.grad = None  # no rank keeps a full gradient
        pending.filled.add(param_index)
        self.log("grad_ready", flat_group.names[param_index])
        if len(pending.filled) == len(flat_group.params):
            if self.on_complete is not None:
                self.on_complete(group_index)
            self._launch_ready()
        # END SOLUTION

    def _launch_ready(self) -> None:
        """Launch, in `order`, every consecutive complete unit from the next unlaunched one."""
        # BEGIN SOLUTION
        while self._next < len(self.order):
            index = self.order[self._next]
            flat_group, pending = self.groups[index], self.pending[index]
            if pending.staging is None or len(pending.filled) < len(flat_group.params):
                break  # an earlier unit is not complete: later ones wait, so every rank launches in one order
            self._drain()  # frees the earlier staging buffers before this launch
            pending.output = torch.empty_like(flat_group.grad)
            pending.work = reduce_scatter_flat(pending.output, pending.staging, group=self.group, async_op=True)
            self.log("reduce_scatter", flat_group.name)
            self._launched.append(index)
            self._next += 1
        # END SOLUTION

    def _drain(self) -> None:
        """Wait for every launched reduce-scatter, add its average into the shard and free its staging buffer."""
        # BEGIN SOLUTION
        for index in self._launched:
            flat_group, pending = self.groups[index], self.pending[index]
            pending.work.wait()
            flat_group.grad.add_(pending.output.div_(self.world_size))
            self.pending[index] = _Pending()  # drops the staging buffer and the output
            self.log("wait", flat_group.name)
            if self.on_reduced is not None:
                self.on_reduced(index, flat_group.grad)
        self._launched = []
        # END SOLUTION

    @torch.no_grad()
    def finish(self) -> None:
        """End of a backward: launch the units still incomplete (a parameter without gradient counts as zeros), wait
        for all, and get ready for the next backward. Does nothing outside a backward."""
        if not self._in_backward:
            return
        # BEGIN SOLUTION
        for index in self.order[self._next:]:
            flat_group, pending = self.groups[index], self.pending[index]
            if pending.staging is None:
                pending.staging = torch.zeros_like(flat_group.full)
            pending.filled = set(range(len(flat_group.params)))  # the missing slots stay zero
        self._launch_ready()
        self._drain()
        self._next = 0
        self._in_backward = False
        # END SOLUTION


def _grad_hook(reducer: "weakref.ref[GradientReducer]", group_index: int, param_index: int):
    """The post-accumulate-grad hook of parameter `param_index` of unit `group_index`: calls the reducer while it
    lives (an engine that is gone leaves hooks that do nothing)."""

    def hook(param: torch.Tensor) -> None:
        alive = reducer()
        if alive is not None:
            alive._on_grad_ready(group_index, param_index, param)
    return hook


# -----------------------------------------------------------------------------
# The engine


class ZeRO2(nn.Module):
    """ZeRO stage 2: replicated parameters; partitioned gradients and optimizer state.

    Args:
        module: the replica on this rank; its trainable parameters become views of flat buffers (rank 0's values).
        group: the data-parallel process group (None: the default group).
        config: see ZeROConfig.
        units: the modules whose parameters form one flat buffer (and one reduce-scatter) each.

    Attributes:
        groups: one FlatGroup per unit; `grad` is its (shard_numel,) gradient shard.
        optimizer: ShardedAdamW (or OffloadAdamW).
        reducer: the GradientReducer whose hooks do the reduce-scatters.
        events: (kind, detail) log when config.record_events.
    """

    def __init__(self, module: nn.Module, *, group: dist.ProcessGroup | None = None,
                 config: ZeROConfig = ZeROConfig(stage=2), units: Sequence[nn.Module] = ()):
        super().__init__()
        self.module, self.group, self.config = module, group, config
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.events: list[tuple[str, str]] = []
        # BEGIN SOLUTION
        self.groups, masters = shard_module(module, units, group=group, param_dtype=config.param_dtype)
        for flat_group in self.groups:
            flat_group.grad = torch.zeros_like(flat_group.shard)
        self.optimizer = make_optimizer(masters, config)
        self.reducer = GradientReducer(self.groups, group=group, on_reduced=self.optimizer.receive, log=self._log)
        # END SOLUTION

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The wrapped model's loss (common.model.Transformer.loss): scalar fp32."""
        return self.module.loss(tokens, targets)

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's gradient shards, all-gather the updated parameters, zero the shards."""
        # BEGIN SOLUTION
        self.reducer.finish()
        masters = self.optimizer.step([flat_group.grad for flat_group in self.groups])
        for flat_group, master in zip(self.groups, masters):
            flat_group.shard.copy_(master)
            all_gather_flat(flat_group.full, flat_group.shard.clone(), group=self.group)
            flat_group.grad.zero_()
        # END SOLUTION

    def _log(self, kind: str, detail: str) -> None:
        if self.config.record_events:
            self.events.append((kind, detail))
