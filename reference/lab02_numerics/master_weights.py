"""fp32 master weights behind a half-precision model, the bf16/fp16 autocast training step, and why masters matter.

What it saves: the forward and backward run in 16-bit (half the activation bytes, tensor-core matmuls), while the
weights the optimizer updates stay in fp32. Micikevicius et al. 2018 ("Mixed Precision Training", arXiv:1710.03740,
Section 3.1): an update lr * g that is smaller than half the spacing of fp16 numbers around w is rounded away,

    fl16(w + dw) == w    whenever |dw| < ulp16(w) / 2,    ulp16(1.0) = 2^-10 ~ 9.8e-4,

so a pure-fp16 model stops learning once its updates get small, however many steps it takes. Keeping an fp32 master
copy W and rounding only the working copy, w = fl16(W), lets the small updates accumulate (ulp32(1.0) = 2^-23).

Two recipes, both here:
    master weights (this file's MasterWeightOptimizer): model in fp16/bf16; grads copied to fp32 masters, unscaled,
        stepped, and the masters rounded back into the model. Model states cost 2 + 2 + 12 bytes/param (memory.py).
    autocast (`train_step`, torch.amp's recipe): parameters stay fp32 and are the masters; matmuls run in bf16 or fp16
        inside `torch.autocast`; fp16 needs the loss scaler (loss_scaler.py), bf16 (8 exponent bits) does not.

Usage:
    train_step(model, tokens, targets, optimizer, precision="bf16")                    # autocast
    train_step(model, tokens, targets, optimizer, precision="fp16", scaler=scaler)     # autocast + loss scaling
    opt = MasterWeightOptimizer(model.half(), lambda ps: torch.optim.AdamW(ps, lr=1e-3), scaler=scaler)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from .loss_scaler import DynamicLossScaler

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
HALF_DTYPES = (torch.float16, torch.bfloat16)

# -----------------------------------------------------------------------------
# The vanishing update (plain PyTorch)


def simulate_small_updates(*, start: float, update: float, steps: int, dtype: torch.dtype) -> dict[str, float]:
    """Add `update` to a weight `steps` times, three ways.

    Returns:
        {"low_precision": w kept in `dtype` the whole time (w <- fl(w + update)),
         "master": an fp32 master W <- W + update, with the model copy fl(W) read at the end,
         "exact": start + steps * update in float64}.
    """
    # BEGIN SOLUTION
    if dtype not in HALF_DTYPES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    low = torch.tensor(start, dtype=dtype)
    master = torch.tensor(start, dtype=torch.float32)
    step = torch.tensor(update, dtype=torch.float32)
    for _ in range(steps):
        low = low + step.to(dtype)  # rounded to `dtype` after every add: the small update may vanish
        master = master + step  # fp32 keeps ~7 digits, so the update survives
    return {"low_precision": float(low), "master": float(master.to(dtype)), "exact": start + steps * update}
    # END SOLUTION


# -----------------------------------------------------------------------------
# Master weights


class MasterWeightOptimizer:
    """An optimizer over fp32 master copies of a half-precision model's parameters.

    Args:
        model: its parameters are fp16 or bf16 (forward and backward run in that dtype).
        make_optimizer: builds the real optimizer from a list of fp32 parameters, e.g. `lambda ps: AdamW(ps, lr=...)`.
        scaler: the loss scaler (needed for fp16; optional for bf16). The caller scales the loss with it.

    Attributes:
        model_params: the model's half-precision parameters that require grad, in order.
        master_params: fp32 leaf tensors, one per model parameter, holding the true weights.
        optimizer: the optimizer built over `master_params`.

    Raises:
        TypeError: a parameter that requires grad is not fp16 or bf16.
    """

    def __init__(self, model: nn.Module, make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer], *,
                 scaler: DynamicLossScaler | None = None):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = scaler
        # BEGIN SOLUTION
        bad = sorted({str(p.dtype) for p in self.model_params if p.dtype not in HALF_DTYPES})
        if bad:
            raise TypeError(f"MasterWeightOptimizer needs an fp16 or bf16 model, found parameters of dtype {bad}")
        # detach + float + clone: a new fp32 leaf that shares nothing with the model copy
        self.master_params = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        # END SOLUTION
        self.optimizer = make_optimizer(self.master_params)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
        for p in self.master_params:
            p.grad = None

    def step(self) -> bool:
        """Copy grads to fp32 masters, unscale (with a scaler), step the masters, round them back into the model.

        A parameter without a gradient gives its master none (the optimizer skips it). The fp32 gradient copies are
        dropped after the step: they are transient, so model states stay at 2 + 2 + 12 bytes per parameter.

        Returns:
            True when the optimizer stepped, False when the scaler skipped the step (a gradient overflowed).
        """
        # BEGIN SOLUTION
        for model_p, master_p in zip(self.model_params, self.master_params):
            # the fp32 copy is taken before unscaling: S * g may overflow fp16, g / S may underflow it
            master_p.grad = None if model_p.grad is None else model_p.grad.float()
        if self.scaler is not None:
            stepped = self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
            stepped = True
        with torch.no_grad():
            for model_p, master_p in zip(self.model_params, self.master_params):
                if stepped:
                    model_p.copy_(master_p)  # round-to-nearest into fp16/bf16
                master_p.grad = None  # the fp32 gradient copy is transient: 2 + 2 + 12 bytes, not 2 + 2 + 4 + 12
        return stepped
        # END SOLUTION


# -----------------------------------------------------------------------------
# The autocast training step


@contextlib.contextmanager
def precision_context(precision: str, device_type: str) -> Iterator[None]:
    """The numerics of one training step: autocast for bf16/fp16, TF32 matmuls for tf32, plain fp32 otherwise.

    TF32 is a global switch in torch; it is restored on exit so one step's choice never leaks into the next.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device_type=device_type, dtype=dtype):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def train_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer, *,
               precision: str, scaler: DynamicLossScaler | None = None,
               max_grad_norm: float | None = None) -> torch.Tensor:
    """One optimizer step of `model.loss(tokens, targets)` in the given precision (parameters stay fp32).

    Args:
        model: an fp32 model with a `loss(tokens, targets)` method.
        tokens, targets: (B, N) int64.
        optimizer: over the model's parameters.
        precision: "fp32", "tf32", "bf16" (autocast) or "fp16" (autocast; needs `scaler`).
        scaler: the dynamic loss scaler; required for fp16, not allowed otherwise.
        max_grad_norm: clip the (unscaled) gradient norm to this value.

    Returns:
        The loss (a detached fp32 scalar tensor; reading it syncs, so the caller decides when).

    Raises:
        ValueError: unknown precision, fp16 without a scaler, or a scaler with another precision.
    """
    # BEGIN SOLUTION
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if (precision == "fp16") != (scaler is not None):
        raise ValueError(f"precision {precision!r}: a loss scaler is needed for fp16 and only for fp16")
    optimizer.zero_grad(set_to_none=True)
    with precision_context(precision, tokens.device.type):
        loss = model.loss(tokens, targets)
    # backward runs outside autocast: autograd replays each op in the dtype its forward used
    if scaler is None:
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not S times them
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    return loss.detach().float()
    # END SOLUTION
