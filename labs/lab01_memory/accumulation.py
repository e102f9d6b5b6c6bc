"""Gradient accumulation: the gradient of a large batch, computed one micro-batch at a time.

What it saves: activation memory scales with the batch that is live at once, so M micro-batches of size B/M need 1/M of
the activations of the full batch, at the cost of M sequential forward/backward passes.

Exactness. The large-batch loss is the mean negative log-likelihood over the T valid tokens of the batch (targets of
-100 are padding):

    L = (1 / T) * sum_{t valid} nll_t                 T = sum_m T_m  over micro-batches m

Gradients are linear, so dL/dθ = sum_m dL_m/dθ exactly when each micro-batch contributes

    L_m = (1 / T) * sum_{t valid in m} nll_t         normalised by the *whole batch's* token count T.

The common bug is L_m = mean_m / M (normalising by the micro-batch count): it equals L only when every micro-batch has
the same number of valid tokens, and silently over-weights short micro-batches otherwise (`naive_accumulate` keeps the
bug, for the notebook to measure).

Usage:
    model.zero_grad()
    loss = accumulate_gradients(model, tokens, targets, num_microbatches=4)
    optimizer.step()
"""

from __future__ import annotations

import torch

from common.model import Transformer

IGNORE_INDEX = -100  # targets with this value are padding and carry no loss

# -----------------------------------------------------------------------------
# Public entry point


def accumulate_gradients(
    model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, *, num_microbatches: int
) -> torch.Tensor:
    """Accumulate into `.grad` the gradient of the token-mean loss over the whole batch, one micro-batch at a time.

    Args:
        model: the model; its `.grad`s are added to (call `zero_grad()` first, as with a normal backward).
        tokens: (B, N) int64 inputs.
        targets: (B, N) int64 targets, IGNORE_INDEX where a position carries no loss.
        num_microbatches: M, 1 <= M <= B; the batch is split along B into M nearly equal parts.

    Returns:
        The large-batch loss L (a detached scalar), equal to `model.loss(tokens, targets)`.

    Raises:
        ValueError: mismatched shapes, M out of range, or a batch with no valid target.
    """
    # TODO (lab01): your code here
    raise NotImplementedError("lab01: accumulate_gradients is not implemented yet (lab01_memory/accumulation.py)")
    return total_loss.to(torch.get_default_dtype())


# -----------------------------------------------------------------------------
# The common bug, kept for comparison


def naive_accumulate(
    model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, *, num_microbatches: int
) -> torch.Tensor:
    """L_m = mean over micro-batch m / M: right only when every micro-batch has the same number of valid tokens."""
    total_loss = torch.zeros(())
    for micro_tokens, micro_targets in zip(
        tokens.tensor_split(num_microbatches), targets.tensor_split(num_microbatches)
    ):
        loss = model.loss(micro_tokens, micro_targets) / num_microbatches
        loss.backward()
        total_loss += loss.detach().float().cpu()
    return total_loss
