"""Activation checkpointing: trade compute for memory by recomputing a segment's forward during backward.

What it saves: autograd normally keeps every intermediate a backward formula needs, so activation memory grows with
depth. A checkpointed segment keeps only its *inputs*; its forward runs under `no_grad` (nothing saved), and when the
gradient arrives the forward is run again with autograd on, then back-propagated through (Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174, Section 3):

    forward:   y = f(x)               under no_grad;  save x (and the RNG state)
    backward:  y' = f(x) recomputed   under enable_grad, with the saved RNG state restored
               (dL/dx, dL/dθ) = vjp(y', dL/dy)

The recomputation must be *the same* computation, so the RNG state is saved before the forward and restored for the
recompute: otherwise dropout draws a different mask and the gradients are silently wrong. Autocast state is replayed
for the same reason.

Usage:
    y = checkpoint(block, x, cos, sin)        # like block(x, cos, sin), but stores only x, cos, sin
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

# -----------------------------------------------------------------------------
# Public entry point


def checkpoint(function: Callable[..., Any], *args: Any, preserve_rng_state: bool = True) -> Any:
    """Run `function(*args)` without saving its intermediates; recompute them in backward.

    Args:
        function: the segment to run, returning a tensor or a tuple of tensors.
        *args: its arguments. Tensors are saved for the recompute; anything else (ints, None, modules) is kept as is.
        preserve_rng_state: restore the CPU (and CUDA) RNG state before recomputing, so dropout replays exactly.

    Returns:
        What `function(*args)` returns.

    Raises:
        TypeError: if `function` is not callable.
    """
    # BEGIN SOLUTION
    if not callable(function):
        raise TypeError(f"checkpoint: function must be callable, got {type(function).__name__}")
    # END SOLUTION
    if torch.is_grad_enabled() and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        # an autograd.Function's output only requires grad if one of its inputs does; parameters used inside
        # `function` are not inputs, so their gradients would be lost
        warnings.warn(
            "checkpoint: no tensor argument requires grad, so the output will not either and the parameters inside "
            "the checkpointed function get no gradient",
            stacklevel=2,
        )
    return CheckpointFunction.apply(function, preserve_rng_state, *args)


# -----------------------------------------------------------------------------
# The autograd.Function


class CheckpointFunction(torch.autograd.Function):
    """forward: run without saving intermediates; backward: recompute with the saved RNG state, then back-propagate."""

    @staticmethod
    def forward(ctx, function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        ctx.function = function
        ctx.preserve_rng_state = preserve_rng_state
        # Tensors go through save_for_backward (so autograd can check they were not modified in place);
        # everything else is kept on ctx at its position.
        ctx.tensor_positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.other_args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.autocast = _autocast_state()
        # BEGIN SOLUTION
        if preserve_rng_state:
            ctx.cpu_rng_state = torch.get_rng_state()
            ctx.cuda_devices = _cuda_devices(args)
            ctx.cuda_rng_states = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_positions))
        with torch.no_grad():
            outputs = function(*args)
        # END SOLUTION
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # BEGIN SOLUTION
        # Rebuild the argument list with fresh leaves, so the recompute builds a graph that ends at them.
        args = list(ctx.other_args)
        for position, saved in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[position] = saved.detach().requires_grad_(saved.requires_grad)

        devices = ctx.cuda_devices if ctx.preserve_rng_state else []
        # fork_rng puts the caller's RNG state back afterwards: the recompute must not shift later random draws
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng_state):
            if ctx.preserve_rng_state:
                torch.set_rng_state(ctx.cpu_rng_state)
                for device, state in zip(devices, ctx.cuda_rng_states):
                    torch.cuda.set_rng_state(state, device)
            with torch.enable_grad(), _replay_autocast(ctx.autocast):
                outputs = ctx.function(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)

        # Back-propagate through the recomputed graph; parameter gradients accumulate into .grad as usual.
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args)
        # END SOLUTION
        return (None, None) + input_grads  # no gradient for `function` and `preserve_rng_state`


# -----------------------------------------------------------------------------
# Helpers: RNG devices and autocast replay


def _cuda_devices(args: tuple) -> list[int]:
    """CUDA devices of the tensor arguments: the RNG streams a recompute on them would draw from."""
    return sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})


def _autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    return {
        device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
    }


class _replay_autocast:
    """Re-enter the autocast regions that were active during the forward (a bf16 forward recomputes in bf16)."""

    def __init__(self, state: dict[str, tuple[bool, torch.dtype]]):
        self.contexts = [torch.autocast(d, dtype=dtype, enabled=on) for d, (on, dtype) in state.items() if on]

    def __enter__(self) -> None:
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)
