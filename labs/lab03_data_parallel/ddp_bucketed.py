"""Bucketed data parallelism: all-reduce gradients in buckets while backward is still running.

What it saves: time. Naive DDP waits for the whole backward, then runs one latency-bound all-reduce per parameter.
Here gradients are packed into a few flat buckets of at most `bucket_cap_mb`; a bucket's all-reduce is launched
asynchronously the moment its last gradient is ready, so communication of late layers overlaps the backward of early
layers, and each message is large enough to be bandwidth-bound. Ideally the step costs max(compute, communication)
instead of their sum (Li et al. 2020, "PyTorch Distributed", arXiv:2006.15704, Section 3.2, Algorithm 1).

Algorithm (the PyTorch DDP reducer, simplified):
1. Construction: check and broadcast as naive DDP does; take the trainable parameters in *reverse* registration order
   (backward produces gradients roughly from the last layer to the first) and pack them greedily into buckets: a
   parameter joins the current bucket unless that would exceed the cap (or change dtype/device), otherwise it opens a
   new bucket. A parameter larger than the cap sits alone. Each bucket owns one flat buffer.
2. A post-accumulate-grad hook on every parameter copies its .grad into its bucket slot. When a bucket's last slot is
   filled it is ready, and ready buckets are launched *in bucket order* with `dist.all_reduce(async_op=True)`: every
   rank must issue its collectives in the same order, whatever order its hooks fire in.
3. `finish()` (after backward): buckets with parameters that got no gradient this step (unused, or not reached) are
   completed with the parameter's existing .grad or zeros and launched; then it waits for every bucket, divides by p
   and copies the averages back into .grad.

Frozen parameters (requires_grad=False) are in no bucket. A tied weight is one Parameter: its hook fires once, after
autograd has summed both uses. Under `no_sync()` the hooks do nothing and gradients accumulate locally; the first
backward outside it all-reduces the accumulated sums (gradient accumulation with one all-reduce per large batch).

Unused parameters delay their bucket, and every later bucket, to `finish()` (torch DDP's find_unused_parameters
searches the graph to avoid that). With `record_events`, `events` logs ("grad_ready", name), ("launch", "bucket i")
and ("wait", "bucket i") with a perf_counter time, in order: the overlap is visible as launches before the last
grad_ready.

Usage:
    model = BucketedDDP(Transformer(config), group=group, config=BucketConfig(bucket_cap_mb=25))
    model.module.loss(tokens, targets).backward()
    model.finish()
    optimizer.step()
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .ddp_naive import broadcast_parameters, check_same_structure

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class BucketConfig:
    """bucket_cap_mb: the most MiB of gradients one bucket holds (torch DDP's default is 25);
    record_events: keep the event log `BucketedDDP.events` (off for benchmarks)."""

    bucket_cap_mb: float = 25.0
    record_events: bool = False

    def __post_init__(self) -> None:
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"BucketConfig.bucket_cap_mb must be > 0, got {self.bucket_cap_mb}")

    @property
    def cap_bytes(self) -> int:
        return max(1, int(self.bucket_cap_mb * 2**20))


# -----------------------------------------------------------------------------
# Bucket plan


def plan_buckets(params: Sequence[torch.Tensor], *, cap_bytes: int) -> list[list[int]]:
    """Group parameters into buckets, in reverse order, each at most `cap_bytes` unless one parameter is larger.

    Args:
        params: the trainable parameters in registration order (any shapes and dtypes).
        cap_bytes: the byte cap of a bucket (> 0).

    Returns:
        Buckets in launch order, each a list of indices into `params`; together they list every index once.
        E.g. sizes [400, 800, 1200, 1600, 2000] bytes with cap 2000 give [[4], [3], [2, 1], [0]].

    Raises:
        ValueError: cap_bytes <= 0.
    """
    if cap_bytes <= 0:
        raise ValueError(f"plan_buckets: cap_bytes must be > 0, got {cap_bytes}")
    # TODO (lab03): your code here
    raise NotImplementedError("lab03: plan_buckets is not implemented yet (lab03_data_parallel/ddp_bucketed.py)")


# -----------------------------------------------------------------------------
# The wrapper


@dataclass
class _Bucket:
    indices: list[int]  # into BucketedDDP.params, in launch order
    offsets: list[int]  # start of each parameter's slot in `buffer`
    buffer: torch.Tensor  # (sum of numels,) flat, the parameters' dtype and device
    filled: set[int] = field(default_factory=set)  # indices whose gradient is in the buffer this step
    work: dist.Work | None = None  # the async all-reduce, once launched


class BucketedDDP(nn.Module):
    """Data parallelism with gradient buckets all-reduced asynchronously during backward.

    Args:
        module: the replica on this rank (already on its device).
        group: the data-parallel process group (None: the default group).
        config: bucket cap and event logging.

    Attributes:
        params: trainable parameters in registration order (a tied weight once).
        bucket_indices: the plan, `plan_buckets(params, cap_bytes=config.cap_bytes)`.
        events: the event log when config.record_events (list of (kind, detail, perf_counter seconds)).

    Raises:
        ValueError: on every rank, when parameter names, shapes, dtypes or requires_grad differ across ranks.
    """

    def __init__(self, module: nn.Module, *, group: dist.ProcessGroup | None = None,
                 config: BucketConfig = BucketConfig()):
        super().__init__()
        self.module, self.group, self.config = module, group, config
        self.world_size = dist.get_world_size(group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        names = {id(p): name for name, p in module.named_parameters()}  # named_parameters also dedups tied weights
        self.param_names = [names[id(p)] for p in self.params]
        self.events: list[tuple[str, str, float]] = []
        self._sync_enabled = True
        self._next_to_launch = 0  # buckets are launched strictly in order, the same on every rank
        # To build: check and broadcast (ddp_naive's helpers); self.bucket_indices = the plan; self.buckets, one _Bucket
        # per plan entry with a zeroed flat buffer; self._slot[param index] = (bucket id, offset); one
        # post-accumulate-grad hook per parameter that calls self._on_grad_ready(index).
        # TODO (lab03): your code here
        raise NotImplementedError("lab03: BucketedDDP.__init__ is not implemented yet (lab03_data_parallel/ddp_bucketed.py)")

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_indices)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside: backward accumulates gradients locally, no communication; call finish() only after the last
        backward, outside the context."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    @torch.no_grad()
    def finish(self) -> None:
        """Complete and launch the remaining buckets, wait for all, and write the averaged gradients into .grad."""
        if not self._sync_enabled:
            return  # inside no_sync(): the gradients stay local until a later synchronised backward
        # TODO (lab03): your code here
        raise NotImplementedError("lab03: BucketedDDP.finish is not implemented yet (lab03_data_parallel/ddp_bucketed.py)")

    # -------------------------------------------------------------------------
    # Hooks

    @torch.no_grad()
    def _on_grad_ready(self, index: int) -> None:
        """Called by autograd once parameter `index`'s .grad is final for this backward."""
        if not self._sync_enabled:
            return
        # TODO (lab03): your code here
        raise NotImplementedError("lab03: BucketedDDP._on_grad_ready is not implemented yet (lab03_data_parallel/ddp_bucketed.py)")

    def _launch_ready(self) -> None:
        """Launch, in bucket order, every consecutive full bucket from the next unlaunched one."""
        # TODO (lab03): your code here
        raise NotImplementedError("lab03: BucketedDDP._launch_ready is not implemented yet (lab03_data_parallel/ddp_bucketed.py)")

    def _log(self, kind: str, detail: str) -> None:
        if self.config.record_events:
            self.events.append((kind, detail, time.perf_counter()))


def apply_bucketed_ddp(model: nn.Module, *, group: dist.ProcessGroup | None = None,
                       config: BucketConfig = BucketConfig()) -> BucketedDDP:
    """The lab's `apply_<technique>` entry point: `BucketedDDP(model, group=group, config=config)`."""
    return BucketedDDP(model, group=group, config=config)
