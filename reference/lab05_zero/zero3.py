"""ZeRO-3: parameter partitioning (P_os+g+p), gathered around each unit's forward and backward.

What it saves: the parameters themselves. Each rank keeps only its 1/N shard of every unit's flat parameter buffer,
so all of the training state is partitioned (Rajbhandari et al. 2020, arXiv:1910.02054, Section 5.3):

    bytes per rank = (2 + 2 + K)Ψ/N  +  the units gathered at the moment (one or two, plus the root unit)

at 1.5x data parallelism's communication: an all-gather before the forward, another before the backward, and the
reduce-scatter of ZeRO-2. This is the design of FSDP (Zhao et al. 2023, arXiv:2304.11277): units are modules, and
everything happens in hooks on them, not by editing the model's code.

Algorithm (for a unit u, a transformer block; `full` is its flat buffer, every parameter a view of it):
- gather(u): re-allocate full's storage (`untyped_storage().resize_`) and all-gather the shards into it,
  asynchronously; the views, and every tensor autograd saved from them, see the data again;
- free(u): `full.untyped_storage().resize_(0)`: the memory goes, the views and saved tensors stay valid objects;
- forward pre-hook: gather(u) and wait; prefetch: gather(u+1) is launched now and overlaps u's forward;
- forward hook: free(u);
- backward pre-hook (before the gradient reaches u's internals): gather(u) and wait; prefetch gather(u-1);
- when u's last parameter gradient has been accumulated (zero2.GradientReducer's hooks): free(u), and its
  gradients are reduce-scattered into the shards as in ZeRO-2;
- end of backward (a callback queued on autograd's engine): free whatever is still gathered.

The "root" unit (embedding, final norm, output head: the parameters outside every block) is gathered when
`engine(tokens)` or `engine.loss(...)` starts and stays gathered until its gradients are in at the end of backward
(FSDP keeps the root unsharded the same way). `step()` updates each master shard and copies it into the parameter
shard: nothing is gathered until the next forward.

Usage:
    engine = ZeRO3(model, group=dp_group, config=ZeROConfig(stage=3, param_dtype=torch.bfloat16))
    engine.loss(tokens, targets).backward()
    engine.step()
    engine.peak_gathered_bytes                         # the most gathered parameter bytes alive at once
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ZeROConfig
from .flat import FlatGroup, all_gather_flat, shard_module
from .zero1 import make_optimizer
from .zero2 import GradientReducer

FREE, GATHERING, GATHERED = "free", "gathering", "gathered"

# -----------------------------------------------------------------------------
# The engine


class ZeRO3(nn.Module):
    """ZeRO stage 3: parameters, gradients and optimizer state all partitioned.

    Args:
        module: the replica on this rank; its trainable parameters become views of flat buffers (rank 0's values).
        group: the data-parallel process group (None: the default group).
        config: see ZeROConfig (prefetch: gather the next unit during the current one).
        units: the modules gathered one at a time (default through apply_zero: the transformer blocks).

    Attributes:
        groups: one FlatGroup per unit; `shard` is this rank's parameter shard (its own storage), `grad` its
            gradient shard, `full` the gathered buffer (no storage while the unit is free).
        optimizer: ShardedAdamW (or OffloadAdamW).
        reducer: the GradientReducer of ZeRO-2, which also tells this engine when a unit's backward is done.
        gathered_bytes, peak_gathered_bytes: bytes of gathered flat buffers alive now, and the most since built.
        events: (kind, detail) log when config.record_events ("all_gather", "free", ... with the unit's name).
    """

    def __init__(self, module: nn.Module, *, group: dist.ProcessGroup | None = None,
                 config: ZeROConfig = ZeROConfig(stage=3), units: Sequence[nn.Module] = ()):
        super().__init__()
        self.module, self.group, self.config = module, group, config
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.events: list[tuple[str, str]] = []
        self.gathered_bytes = 0
        self.peak_gathered_bytes = 0
        self._in_backward = False
        self.groups: list[FlatGroup]
        # To build: shard_module; for every group its own shard (a copy), a zero gradient shard, and its gathered
        # buffer freed; self._state (FREE/GATHERING/GATHERED per group) and self._work (pending all-gathers); the
        # optimizer and a GradientReducer calling self._after_backward; self.forward_order (the unit groups in model
        # order) and self.root (index of "root", or None); and the three hooks on each unit's module.
        # BEGIN SOLUTION
        self.groups, masters = shard_module(module, units, group=group, param_dtype=config.param_dtype)
        self._state = [GATHERED] * len(self.groups)
        self._work: dict[int, dist.Work] = {}
        for index, flat_group in enumerate(self.groups):
            flat_group.shard = flat_group.shard.clone()  # the only parameter bytes kept between uses
            flat_group.grad = torch.zeros_like(flat_group.shard)
            self.gathered_bytes += self._nbytes(index)
            self._free(index)
        self.optimizer = make_optimizer(masters, config)
        self.reducer = GradientReducer(self.groups, group=group, on_complete=self._after_backward,
                                       on_reduced=self.optimizer.receive, log=self._log)
        self.forward_order = [index for index, g in enumerate(self.groups) if g.name != "root"]
        self.root = next((index for index, g in enumerate(self.groups) if g.name == "root"), None)
        for index in self.forward_order:
            unit = self.groups[index].module
            unit.register_forward_pre_hook(lambda m, args, index=index: self._before_forward(index))
            unit.register_forward_hook(lambda m, args, output, index=index: self._free(index))
            unit.register_full_backward_pre_hook(lambda m, grad_output, index=index: self._before_backward(index))
        # END SOLUTION

    # -------------------------------------------------------------------------
    # Running the model

    def forward(self, *args, **kwargs):
        return self._run(lambda: self.module(*args, **kwargs))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The wrapped model's loss (common.model.Transformer.loss): scalar fp32."""
        return self._run(lambda: self.module.loss(tokens, targets))

    def _run(self, compute):
        """Gather root, compute; without autograd no backward will come to free it, so free everything now."""
        if self.root is not None:
            self._gather(self.root)
            self._wait(self.root)
        output = compute()
        if not torch.is_grad_enabled():
            for index in range(len(self.groups)):
                self._free(index)
        return output

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on this rank's gradient shards; the updated masters become the parameter shards."""
        # BEGIN SOLUTION
        self.reducer.finish()
        masters = self.optimizer.step([flat_group.grad for flat_group in self.groups])
        for flat_group, master in zip(self.groups, masters):
            flat_group.shard.copy_(master)  # cast to the in-flight dtype; gathered at the next forward
            flat_group.grad.zero_()
        # END SOLUTION

    # -------------------------------------------------------------------------
    # Hooks

    def _before_forward(self, index: int) -> None:
        # BEGIN SOLUTION
        self._gather(index)
        self._wait(index)
        position = self.forward_order.index(index)
        if self.config.prefetch and position + 1 < len(self.forward_order):
            self._gather(self.forward_order[position + 1])  # overlaps this unit's forward
        # END SOLUTION

    def _before_backward(self, index: int) -> None:
        if not self._in_backward:  # the first unit of this backward: free what is left when backward ends
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        # BEGIN SOLUTION
        self._gather(index)
        self._wait(index)
        position = self.forward_order.index(index)
        if self.config.prefetch and position > 0:
            self._gather(self.forward_order[position - 1])  # backward runs the units in reverse
        # END SOLUTION

    def _after_backward(self, index: int) -> None:
        """The GradientReducer's on_complete: every gradient of unit `index` is in, so its parameters can go."""
        self._free(index)

    def _end_backward(self) -> None:
        for index in range(len(self.groups)):
            self._free(index)
        self._in_backward = False

    # -------------------------------------------------------------------------
    # Gather and free

    def _nbytes(self, index: int) -> int:
        full = self.groups[index].full
        return full.numel() * full.element_size()

    def _gather(self, index: int) -> None:
        """Allocate unit `index`'s flat buffer and launch the all-gather of its shards (no-op unless free)."""
        if self._state[index] != FREE:
            return
        flat_group = self.groups[index]
        # BEGIN SOLUTION
        flat_group.full.untyped_storage().resize_(self._nbytes(index))
        self._work[index] = all_gather_flat(flat_group.full, flat_group.shard, group=self.group, async_op=True)
        self._state[index] = GATHERING
        self.gathered_bytes += self._nbytes(index)
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)
        # END SOLUTION
        self._log("all_gather", flat_group.name)

    def _wait(self, index: int) -> None:
        """Wait for unit `index`'s all-gather, if one is in flight."""
        # BEGIN SOLUTION
        if self._state[index] == GATHERING:
            self._work.pop(index).wait()
            self._state[index] = GATHERED
        # END SOLUTION

    def _free(self, index: int) -> None:
        """Release unit `index`'s gathered buffer (its views and saved tensors keep their shape, not their memory)."""
        if self._state[index] == FREE:
            return
        # BEGIN SOLUTION
        self._wait(index)  # never free memory a collective is still writing
        self.groups[index].full.untyped_storage().resize_(0)
        self._state[index] = FREE
        self.gathered_bytes -= self._nbytes(index)
        # END SOLUTION
        self._log("free", self.groups[index].name)

    def _log(self, kind: str, detail: str) -> None:
        if self.config.record_events:
            self.events.append((kind, detail))
