"""ZeRO-Offload: the fp32 master weights, Adam's moments and the optimizer step live in CPU memory.

What it saves: GPU memory, the K = 12 bytes per parameter of optimizer state that even ZeRO leaves at KΨ/N per
rank. ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training", arXiv:2101.06840)
keeps them in host memory and runs the (memory-bound, cheap) AdamW step on the CPU, on top of ZeRO-2:

    GPU   2Ψ (bf16 parameters)  +  2Ψ/N (bf16 gradient shard)
    CPU   KΨ/N (fp32 master, m, v)  +  2Ψ/N (the gradient shard, copied over)

Algorithm (Section 4 of the paper; one step):
1. during backward, as soon as a unit's gradient shard is reduced (zero2.GradientReducer calls `receive`), its copy
   to a pinned host buffer is queued on a side CUDA stream: the copy overlaps the backward of earlier units;
2. `step` waits for the copies, upcasts each gradient shard to fp32 on the CPU and runs AdamW there;
3. the engine copies each updated master shard back into the device's parameter shard (cast to bf16) and, for
   stages 1 and 2, all-gathers the parameters.

On a machine without a GPU the "device" is the CPU too: the state is where it would be, the copies are plain and
the results are those of the non-offloaded engine, exactly. With gradient accumulation every backward re-copies the
(accumulated) shard; the last copy before `step` is the sum.

Usage:
    engine = apply_zero(model, group=dp_group, config=ZeROConfig(stage=2, param_dtype=torch.bfloat16, offload=True))
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import ZeROConfig
from .zero1 import adamw_step

# -----------------------------------------------------------------------------
# The optimizer on the host


class OffloadAdamW:
    """ShardedAdamW's interface, with every state tensor in (pinned, when CUDA is used) CPU memory.

    Args:
        masters: one (S,) master shard per unit, on the device; copied to the host here.
        config: the AdamW hyper-parameters.

    Attributes:
        masters, exp_avg, exp_avg_sq: one (S,) host tensor per unit each (the masters' dtype, fp32).
        host_grads: one (S,) host tensor per unit for the gradient copies (allocated at the first copy, in the
            gradient's dtype), or None.
        step_count: t, the number of steps taken.
    """

    offloaded = True

    def __init__(self, masters: Sequence[torch.Tensor], config: ZeROConfig):
        self.config = config
        self.device = masters[0].device if masters else torch.device("cpu")
        self.pin = self.device.type == "cuda"  # pinned memory: asynchronous copies, and only where CUDA is
        # a side stream for the device-to-host copies, so they overlap the backward on the default stream
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.masters = [self._host_like(m, m.dtype).copy_(m) for m in masters]
        self.exp_avg = [torch.zeros_like(m) for m in self.masters]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.masters]
        self.host_grads: list[torch.Tensor | None] = [None] * len(self.masters)
        self._copied: list[object] = [None] * len(self.masters)  # per unit: a CUDA event, True, or None
        self.step_count = 0

    def _host_like(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=dtype, device="cpu", pin_memory=self.pin)

    def receive(self, index: int, grad: torch.Tensor) -> None:
        """Start copying unit `index`'s (S,) gradient shard to the host (asynchronously on a GPU, see copy_to_host),
        and remember how to wait for it."""
        if self.host_grads[index] is None:
            self.host_grads[index] = self._host_like(grad, grad.dtype)
        # BEGIN SOLUTION
        self._copied[index] = copy_to_host(self.host_grads[index], grad, self.copy_stream)
        # END SOLUTION

    def step(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """AdamW on the host. `grads` are the device's (S,) gradient shards: those not copied during backward
        (ZeRO-1 has no hooks) are copied now. Returns the host master shards."""
        self.step_count += 1
        # BEGIN SOLUTION
        for index, grad in enumerate(grads):
            if self._copied[index] is None:
                self.receive(index, grad)
        for index, copied in enumerate(self._copied):
            wait_for_copy(copied)  # the host buffer holds the gradient from here on
            grad = self.host_grads[index].to(self.masters[index].dtype)  # fp32 math on the CPU
            state = (self.exp_avg[index], self.exp_avg_sq[index])
            adamw_step(self.masters[index], grad, *state, step=self.step_count, config=self.config)
        self._copied = [None] * len(self.masters)
        # END SOLUTION
        return self.masters

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the optimizer state (host memory)."""
        return [*self.masters, *self.exp_avg, *self.exp_avg_sq]


# -----------------------------------------------------------------------------
# Copies between the device and the host


def copy_to_host(host: torch.Tensor, grad: torch.Tensor, stream: "torch.cuda.Stream | None"):
    """Copy `grad` into the host buffer: on `stream` and asynchronously when there is one (returns the CUDA event
    that marks the copy done), plainly otherwise (returns True)."""
    if stream is None:
        host.copy_(grad)
        return True
    # the copy must see the gradient as the default stream left it, and the gradient must outlive the copy
    stream.wait_stream(torch.cuda.current_stream(grad.device))
    with torch.cuda.stream(stream):
        host.copy_(grad, non_blocking=True)
        grad.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
    return done


def wait_for_copy(copied) -> None:
    """Block until a copy_to_host has landed (a no-op for a plain copy)."""
    if isinstance(copied, torch.cuda.Event):
        copied.synchronize()

