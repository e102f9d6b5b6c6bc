"""The router of a Mixture-of-Experts layer: which experts see each token, with what weight, and how balanced.

What it saves: compute per token. A layer with E experts holds E times the parameters of one MLP, yet each token runs
through only k of them, so parameters grow with E while FLOPs per token grow with k. The router decides which k.

Token choice (Shazeer et al. 2017, arXiv:1701.06538; Mixtral, Jiang et al. 2024, arXiv:2401.04088, Section 2.1):

    p(x)        = softmax(x W_r^T)                      (E,) router probabilities, in fp32
    top-k       = the k largest p_i(x):  experts e_1..e_k, weights w_j = p_{e_j}(x) / sum_j' p_{e_j'}(x)
    y           = sum_j w_j * Expert_{e_j}(x)

Mixtral renormalises the k weights to sum to 1. The Switch Transformer (Fedus et al. 2021, arXiv:2101.03961) routes
to k = 1 expert and keeps the raw probability as the weight, w = p_e(x): renormalised, a top-1 weight would always be 1
and the router would get no gradient through it.

Load balancing, Switch eq. 4, over a batch of T tokens and the k T assignments:

    f_i = (assignments to expert i) / (k T)           P_i = (1/T) sum_x p_i(x)         L_aux = E * sum_i f_i * P_i

L_aux = 1 when routing is uniform (f_i = P_i = 1/E) and grows towards E as it collapses onto one expert. f is not
differentiable; the gradient flows through P. (For k = 1 this is eq. 4; HF's Mixtral uses the same f_i without the
1/k, so its loss is k times this one.) The router z-loss of ST-MoE (Zoph et al. 2022, arXiv:2202.08906, eq. 5)
keeps the logits small, which keeps the softmax in bf16 stable:

    L_z = (1/T) sum_x (log sum_i exp(x W_r^T)_i)^2

Capacity (GShard, Lepikhin et al. 2020, arXiv:2006.16668; Switch, Section 2.2): an expert takes at most

    capacity = ceil(capacity_factor * k * T / E)

assignments. They are served in priority order, every token's first choice (in token order) before any second
choice; the rest are dropped. A dropped assignment contributes nothing, so a token whose every assignment is dropped
leaves the MoE layer as zero and rides the residual connection unchanged.

Expert choice (Zhou et al. 2022, arXiv:2202.09368, Section 3.1) turns the selection around: each expert takes the
`capacity` tokens with the highest scores S = softmax(x W_r^T) in its column, G, I = TopK(S^T, capacity). Every
expert is exactly full, so no balancing loss is needed; a token may get any number of experts, including none.

Usage:
    routing = route(logits, top_k=2)                        # logits (T, E) = x @ W_r^T
    routing.experts, routing.weights, routing.keep          # (T, k) each
    loss = ce + 0.01 * routing.aux_loss + 1e-3 * routing.z_loss
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def softmax_dtype(logits: torch.Tensor) -> torch.dtype:
    """The router's arithmetic runs in at least fp32 (bf16 logits are upcast; fp64 ones, in gradient tests, stay)."""
    return torch.promote_types(logits.dtype, torch.float32)


# -----------------------------------------------------------------------------
# What the router returns


@dataclass(frozen=True)
class Routing:
    """The router's decision for T tokens, top-k of E experts. "float32" below means at least float32: float64 logits
    (the gradient tests) keep float64.

    experts: (T, k) int64, the chosen experts of each token, best first.
    weights: (T, k) float32, their combine weights (zero where the assignment was dropped).
    keep: (T, k) bool, False where capacity dropped the assignment.
    probs: (T, E) float32, the softmax of the logits.
    counts: (E,) int64, assignments routed to each expert before any was dropped.
    aux_loss: () float32, the load-balancing loss E * sum_i f_i P_i (differentiable through P).
    z_loss: () float32, the router z-loss mean_x logsumexp(logits)^2.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


# -----------------------------------------------------------------------------
# Public entry point


def route(logits: torch.Tensor, *, top_k: int, renormalize: bool = True,
          capacity_factor: float | None = None) -> Routing:
    """Token-choice top-k routing with the balancing losses and, optionally, a capacity limit.

    Args:
        logits: (T, E) router logits x @ W_r^T, any float dtype (the softmax runs in fp32).
        top_k: k experts per token, 1 <= k <= E.
        renormalize: divide the k weights by their sum (Mixtral); False keeps the raw probabilities (Switch).
        capacity_factor: None for no limit; otherwise each expert keeps at most
            `expert_capacity(T, E, k, capacity_factor)` assignments and the rest are dropped.

    Returns:
        Routing, see its docstring.

    Raises:
        ValueError: logits not 2-D, top_k outside [1, E], or a capacity factor <= 0.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: route is not implemented yet (lab09_moe/router.py)")


# -----------------------------------------------------------------------------
# Token choice: top-k, and the Switch router


def top_k_routing(logits: torch.Tensor, top_k: int, *, renormalize: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over the E experts, then the k largest probabilities, as Mixtral's router does.

    Args:
        logits: (T, E) any float dtype.
        top_k: k, 1 <= k <= E.
        renormalize: weights w_j = p_{e_j} / sum of the k chosen probabilities; else w_j = p_{e_j}.

    Returns:
        weights (T, k) float32, experts (T, k) int64 (largest probability first), probs (T, E) float32.

    Raises:
        ValueError: top_k outside [1, E].
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: top_k_routing is not implemented yet (lab09_moe/router.py)")


def switch_routing(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Switch Transformer's router: top-1, weighted by the raw probability p_e(x) (Fedus et al. 2021, eq. 2).

    Returns:
        weights (T, 1) float32, experts (T, 1) int64, probs (T, E) float32.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: switch_routing is not implemented yet (lab09_moe/router.py)")


# -----------------------------------------------------------------------------
# The balancing losses


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """L_aux = E * sum_i f_i * P_i (Switch eq. 4), with f_i the fraction of the k T assignments sent to expert i.

    Args:
        probs: (T, E) float32 router probabilities (gradients flow through them).
        experts: (T, k) int64 chosen experts (before any capacity drop).

    Returns:
        () float32; 1 for perfectly uniform routing. 0 when T = 0.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: load_balancing_loss is not implemented yet (lab09_moe/router.py)")


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_z = mean over tokens of logsumexp(logits)^2 (ST-MoE eq. 5), in fp32.

    Args:
        logits: (T, E).

    Returns:
        () float32; 0 when T = 0.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: router_z_loss is not implemented yet (lab09_moe/router.py)")


# -----------------------------------------------------------------------------
# Capacity and token dropping


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * k * T / E) (GShard, Switch Section 2.2).

    Raises:
        ValueError: a capacity factor <= 0, or non-positive E or k.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: expert_capacity is not implemented yet (lab09_moe/router.py)")


def capacity_mask(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit: each expert keeps its first `capacity`, in priority order.

    Priority: every token's first choice, in token order, then every token's second choice, and so on (GShard's
    order: a token's best expert matters more than another token's second best).

    Args:
        experts: (T, k) int64.
        num_experts: E.
        capacity: assignments per expert, >= 0.

    Returns:
        keep: (T, k) bool.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: capacity_mask is not implemented yet (lab09_moe/router.py)")


# -----------------------------------------------------------------------------
# Expert choice (the graded extension)


def expert_choice_routing(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each expert picks its `capacity` highest-scoring tokens (Zhou et al. 2022, Section 3.1).

    Args:
        logits: (T, E).
        capacity: tokens per expert, 1 <= capacity <= T.

    Returns:
        gates (E, capacity) float32: S[token, expert] of each pick, best first;
        token_index (E, capacity) int64: the picked tokens;
        probs (T, E) float32: S = softmax(logits) over the experts.

    Raises:
        ValueError: capacity outside [1, T].
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: expert_choice_routing is not implemented yet (lab09_moe/router.py)")
