"""Dispatch: gather each expert's tokens into one contiguous slice, and scatter the results back, weighted.

What it saves: kernel launches and padding. After routing, token t goes to experts e_1..e_k. Running the experts
one token at a time, or on a dense (E, capacity, C) buffer padded with zeros (GShard's einsum dispatch), wastes time
or memory. Sorting the k T assignments by expert instead puts each expert's rows next to each other,

    x_sorted = x[token_index]                    (A, C), A = the kept assignments, grouped by expert
    counts_e = |{assignments to expert e}|       offsets = [0, counts_0, counts_0 + counts_1, ...]   (E + 1,)

so expert e's rows are x_sorted[offsets[e]:offsets[e + 1]], and one grouped GEMM (grouped_gemm.py) runs all the
experts in one launch. Combining is the transpose of the gather, weighted by the router:

    out[t] = sum over the assignments a of token t:  w_a * y_sorted[a]           (T, C)

This is the "permute / unpermute" of Megablocks (Gale et al. 2022, arXiv:2211.15841, Section 5.1) and of Megatron
Core's token dispatcher. Both steps are differentiable: the gather's backward scatters gradients back to x, and the
weighted sum sends dL/dw_a = <dL/dout[t], y_sorted[a]> to the router.

Usage:
    plan = make_dispatch(routing.experts, num_experts=E, keep=routing.keep)
    y_sorted = expert_mlp(permute(x, plan), plan.offsets, ...)
    out = unpermute(y_sorted, plan, routing.weights, num_tokens=T)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# -----------------------------------------------------------------------------
# The dispatch plan


@dataclass(frozen=True)
class Dispatch:
    """Where each row of the expert-sorted buffer comes from, and where each expert's slice starts.

    token_index: (A,) int64, the token (row of x) of each sorted row.
    assignment: (A,) int64, the flat index t * k + j of each sorted row's assignment (its router weight's index).
    counts: (E,) int64, rows per expert.
    offsets: (E + 1,) int64, offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e]; offsets[E] = A.
    """

    token_index: torch.Tensor
    assignment: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


# -----------------------------------------------------------------------------
# Public entry points


def make_dispatch(experts: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None) -> Dispatch:
    """Sort the kept assignments by expert (stable: within an expert, in token order).

    Args:
        experts: (T, k) int64, each token's experts.
        num_experts: E.
        keep: (T, k) bool, False for assignments dropped by capacity; None keeps all.

    Returns:
        Dispatch with A = the number of kept assignments.

    Raises:
        ValueError: an expert index outside [0, E), or keep of another shape.
    """
    # BEGIN SOLUTION
    if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= num_experts):
        raise ValueError(f"expert indices must be in [0, {num_experts}), got [{int(experts.min())}, "
                         f"{int(experts.max())}]")
    if keep is not None and keep.shape != experts.shape:
        raise ValueError(f"keep {tuple(keep.shape)} must have the shape of experts {tuple(experts.shape)}")
    flat = experts.reshape(-1)  # (T k,), token-major: assignment t * k + j
    kept = torch.arange(flat.numel(), device=flat.device)
    if keep is not None:
        kept = kept[keep.reshape(-1)]
    order = torch.argsort(flat[kept], stable=True)  # group by expert, token order within each
    assignment = kept[order]
    counts = torch.bincount(flat[assignment], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    return Dispatch(token_index=assignment // experts.shape[1], assignment=assignment, counts=counts,
                    offsets=offsets)
    # END SOLUTION


def permute(x: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Gather the tokens into expert order: (T, C) -> (A, C); a token routed to k experts appears k times.

    Args:
        x: (T, C) tokens.
        plan: from `make_dispatch`.

    Returns:
        (A, C), x's dtype; differentiable (the gradient of a repeated token is the sum over its copies).
    """
    # BEGIN SOLUTION
    return x.index_select(0, plan.token_index)
    # END SOLUTION


def unpermute(y: torch.Tensor, plan: Dispatch, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Scatter the expert outputs back to their tokens, weighted: out[t] = sum_a w_a * y[a].

    Args:
        y: (A, C) expert outputs, in the sorted order of `plan`.
        plan: from `make_dispatch`.
        weights: (T, k) router weights (any float dtype; gradients flow to them), indexed by plan.assignment.
        num_tokens: T. A token with no kept assignment gets a zero row.

    Returns:
        (T, C) in y's dtype. The weighted sum is accumulated in at least fp32.
    """
    # BEGIN SOLUTION
    accumulate = torch.promote_types(y.dtype, torch.float32)
    gathered = weights.reshape(-1).index_select(0, plan.assignment).to(accumulate)  # (A,) each row's weight
    out = torch.zeros(num_tokens, y.shape[1], dtype=accumulate, device=y.device)
    out = out.index_add(0, plan.token_index, y.to(accumulate) * gathered[:, None])
    return out.to(y.dtype)
    # END SOLUTION
