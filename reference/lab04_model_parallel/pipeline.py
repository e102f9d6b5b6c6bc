"""Pipeline parallelism: the blocks split into p stages, micro-batches, and one runtime that executes any schedule.

What it saves: a rank holds 1/p of the blocks (parameters, gradients, optimizer state) and sends only the activations
at its stage's boundary, (B/m, N, C) per micro-batch, to one neighbour: far less traffic than tensor parallelism's
all-reduces, at the price of the bubble (schedules.py).

GPipe (Huang et al. 2019, arXiv:1811.06965): split the batch into m micro-batches; stage s runs F(i) on micro-batch i
when stage s-1 sends it the activation, and B(i) when stage s+1 sends back the activation's gradient. The loss is the
mean over micro-batches, so each micro-batch's loss is scaled by 1/m and the accumulated gradients equal the whole
batch's (micro-batches of equal size and no ignored targets). The order of F and B on each rank is the schedule's
(`schedules.gpipe`, `schedules.one_f_one_b`); the runtime just follows it.

Point-to-point traffic goes through `dist.batch_isend_irecv`. Sends are not waited for: the send an action produces
joins the receive that the rank's next action needs in one batch. When two neighbours each send to the other, NCCL
then runs both transfers in one group instead of deadlocking (each side's send waiting for the other's receive).

The runtime records each action's start and end (host clock on CPU; CUDA events on a GPU), the per-rank timelines
the notebook draws as the papers' Gantt charts.

Usage (pp_group from common.mesh.build_mesh(pp=...).pp_group; every rank passes the same full model):
    stage = PipelineStage(model, stage_index=mesh.pp_rank, num_stages=mesh.pp_size)
    runtime = PipelineRuntime(stage, pp_group=mesh.pp_group, config=PipelineConfig(num_microbatches=8))
    loss = runtime.step(tokens, targets)     # the batch's loss on the last stage, None elsewhere; grads in .grad
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .schedules import Action, gpipe, one_f_one_b

SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """num_microbatches: m; schedule: "gpipe" or "1f1b"."""

    num_microbatches: int
    schedule: str = "1f1b"

    def __post_init__(self) -> None:
        if self.num_microbatches < 1:
            raise ValueError(f"PipelineConfig.num_microbatches must be >= 1, got {self.num_microbatches}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PipelineConfig.schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")


@dataclass(frozen=True)
class TimelineEvent:
    """One action as it ran: kind "F"/"B", micro-batch, start and end in seconds from the step's start."""

    kind: str
    microbatch: int
    start: float
    end: float


# -----------------------------------------------------------------------------
# Stages and micro-batches


def partition_blocks(num_blocks: int, num_stages: int) -> list[tuple[int, int]]:
    """Blocks [start, stop) of each stage: contiguous, sizes differing by at most one, the larger ones first.

    Example: 7 blocks over 3 stages -> [(0, 3), (3, 5), (5, 7)].

    Raises:
        ValueError: num_stages < 1 or more stages than blocks (naming both numbers).
    """
    # BEGIN SOLUTION
    if num_stages < 1 or num_stages > num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {num_stages} pipeline stages: need 1 <= "
                         f"num_stages <= num_blocks")
    base, extra = divmod(num_blocks, num_stages)
    bounds, start = [], 0
    for stage in range(num_stages):
        stop = start + base + (stage < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
    # END SOLUTION


def split_microbatches(tensor: torch.Tensor, num_microbatches: int) -> list[torch.Tensor]:
    """`num_microbatches` equal slices of `tensor` along dim 0.

    Raises:
        ValueError: num_microbatches does not divide the batch size (naming both).
    """
    # BEGIN SOLUTION
    if tensor.shape[0] % num_microbatches:
        raise ValueError(f"the batch size ({tensor.shape[0]}) must be divisible by num_microbatches "
                         f"({num_microbatches})")
    return list(tensor.chunk(num_microbatches))
    # END SOLUTION


class PipelineStage(nn.Module):
    """Stage `stage_index` of `num_stages` of a Transformer (or a TensorParallelTransformer): its share of the blocks,
    plus the embedding on the first stage and the final norm and output layer on the last.

    forward(x): tokens (B, N) on the first stage, the previous stage's activation (B, N, C) elsewhere; returns the
    activation (B, N, C), or the logits on the last stage. Blocks keep their global names ("blocks.5.attn..."), so
    the stage's parameter names are the full model's.

    Raises:
        ValueError: stage_index outside [0, num_stages), more stages than blocks, or tied embeddings with several
            stages.
    """

    def __init__(self, model: nn.Module, *, stage_index: int, num_stages: int):
        super().__init__()
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index ({stage_index}) must be in [0, num_stages ({num_stages}))")
        if model.config.tie_embeddings and num_stages > 1:
            # the first and last stages would each hold a copy whose gradients must be summed (Megatron-LM does)
            raise ValueError("PipelineStage: tied embeddings across several stages are not supported")
        self.stage_index, self.num_stages = stage_index, num_stages
        self.start, self.stop = partition_blocks(len(model.blocks), num_stages)[stage_index]
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.embed = model.embed if self.is_first else None
        self.blocks = nn.ModuleDict({str(index): model.blocks[index] for index in range(self.start, self.stop)})
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.width = model.config.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION
        if self.is_first:
            x = self.embed(x)  # (B, N, C)
        N = x.shape[1]
        for block in self.blocks.values():
            x = block(x, self.rope_cos[:N], self.rope_sin[:N])
        if self.is_last:
            x = self.lm_head(self.norm(x))  # (B, N, V)
        return x
        # END SOLUTION


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: mean NLL of logits (B, N, V) against targets (B, N), in at least fp32."""
    logits = logits.flatten(0, 1)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.flatten(),
                           ignore_index=-100)


# -----------------------------------------------------------------------------
# The runtime


class PipelineRuntime:
    """Runs one training step's forwards and backwards in the order the schedule gives this rank.

    Args:
        stage: this rank's stage (a PipelineStage, or any module with is_first, is_last, width and
            forward(x) as PipelineStage has).
        pp_group: the pipeline group; its rank i runs stage i.
        config: micro-batches and schedule.
        loss_fn: (logits, targets) -> scalar mean loss of one micro-batch, on the last stage.
        dp_group: if given, gradients are averaged over it after the step (data-parallel replicas of the pipeline).
    """

    def __init__(self, stage: nn.Module, *, pp_group: dist.ProcessGroup, config: PipelineConfig,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_loss,
                 dp_group: dist.ProcessGroup | None = None):
        self.stage, self.pp_group, self.config, self.loss_fn, self.dp_group = stage, pp_group, config, loss_fn, dp_group
        self.pp_rank, self.pp_size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
        self.rank = dist.get_rank()
        self.actions: list[Action] = SCHEDULES[config.schedule](self.pp_size, config.num_microbatches)[self.pp_rank]
        self.prev_rank = dist.get_global_rank(pp_group, self.pp_rank - 1) if self.pp_rank > 0 else None
        self.next_rank = dist.get_global_rank(pp_group, self.pp_rank + 1) if self.pp_rank < self.pp_size - 1 else None
        self.timeline: list[TimelineEvent] = []

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """One step over the batch: forwards and backwards of every micro-batch, gradients accumulated in .grad.

        Args:
            tokens, targets: (B, N) int64, the same on every rank of the pipeline (only the first stage reads
                tokens and only the last reads targets).

        Returns:
            On the last stage, the batch's loss (the mean of the micro-batches' losses, detached); None elsewhere.

        Raises:
            ValueError: num_microbatches does not divide B.
            RuntimeError: an action failed; the message names PipelineRuntime.step, the rank, the stage, the
                action and micro-batch, and the error.
        """
        m = self.config.num_microbatches
        token_chunks, target_chunks = split_microbatches(tokens, m), split_microbatches(targets, m)
        device = next(self.stage.parameters()).device
        dtype = next(p for p in self.stage.parameters() if p.is_floating_point()).dtype
        # every boundary tensor has the micro-batch's activation shape
        shape = (token_chunks[0].shape[0], token_chunks[0].shape[1], self.stage.width)
        self._pending_sends: list[dist.P2POp] = []
        self._sent: list = []  # works of sends in flight, and their tensors (kept alive until the step ends)
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        losses: list[torch.Tensor] = []
        self.timeline, clock = [], _Clock(device)
        for action in self.actions:
            i = action.microbatch
            try:
                # BEGIN SOLUTION
                if action.kind == "F":
                    if self.stage.is_first:
                        self._flush()
                        x = token_chunks[i].to(device)
                    else:
                        x = self._receive(self.prev_rank, shape, dtype, device).requires_grad_()
                    began = clock.now()
                    out = self.stage(x)
                    if self.stage.is_last:
                        out = self.loss_fn(out, target_chunks[i].to(device)) / m
                        losses.append(out.detach())
                    else:
                        self._pending_sends.append(dist.P2POp(dist.isend, out.detach(), self.next_rank))
                    self._inputs[i], self._outputs[i] = x, out
                else:
                    if self.stage.is_last:
                        self._flush()
                        grad = None
                    else:
                        grad = self._receive(self.next_rank, shape, dtype, device)
                    began = clock.now()
                    x, out = self._inputs.pop(i), self._outputs.pop(i)
                    torch.autograd.backward(out, grad)
                    if not self.stage.is_first:
                        self._pending_sends.append(dist.P2POp(dist.isend, x.grad, self.prev_rank))
                self.timeline.append(TimelineEvent(action.kind, i, began, clock.now()))
                # END SOLUTION
            except Exception as error:
                raise RuntimeError(
                    f"PipelineRuntime.step: rank {self.rank} (stage {self.pp_rank}) failed in {action.kind} of "
                    f"micro-batch {i}: {type(error).__name__}: {error}") from error
        self._flush()
        for work, _ in self._sent:
            work.wait()
        self.timeline = clock.resolve(self.timeline)
        if self.dp_group is not None:
            average_gradients(self.stage, group=self.dp_group)
        return torch.stack(losses).sum() if self.stage.is_last else None

    # ---- point-to-point

    def _receive(self, peer: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Receive one boundary tensor from global rank `peer`, batched with the sends waiting to go."""
        buffer = torch.empty(shape, dtype=dtype, device=device)
        ops = self._pending_sends + [dist.P2POp(dist.irecv, buffer, peer)]
        works = dist.batch_isend_irecv(ops)
        self._sent += [(work, op.tensor) for work, op in zip(works[:-1], ops[:-1])]
        self._pending_sends = []
        works[-1].wait()
        return buffer

    def _flush(self) -> None:
        """Start the sends waiting to go (an action that receives nothing has nothing to batch them with)."""
        if self._pending_sends:
            works = dist.batch_isend_irecv(self._pending_sends)
            self._sent += [(work, op.tensor) for work, op in zip(works, self._pending_sends)]
            self._pending_sends = []


def average_gradients(module: nn.Module, *, group: dist.ProcessGroup) -> None:
    """Average .grad of every parameter over `group` (data-parallel replicas; lab 03 builds this properly)."""
    size = dist.get_world_size(group)
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
            param.grad /= size


# -----------------------------------------------------------------------------
# Timing


class _Clock:
    """Host time on CPU; CUDA events on a GPU (resolved to seconds once the step has finished)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
        else:
            self.origin = time.perf_counter()

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter() - self.origin

    def resolve(self, timeline: list[TimelineEvent]) -> list[TimelineEvent]:
        if not self.cuda:
            return timeline
        torch.cuda.synchronize()
        seconds = lambda event: self.origin.elapsed_time(event) / 1e3  # noqa: E731
        return [TimelineEvent(e.kind, e.microbatch, seconds(e.start), seconds(e.end)) for e in timeline]
