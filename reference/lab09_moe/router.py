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
    # BEGIN SOLUTION
    if logits.dim() != 2:
        raise ValueError(f"logits must be (T, E), got shape {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    weights, experts, probs = top_k_routing(logits, top_k, renormalize=renormalize)
    keep = torch.ones_like(experts, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
        keep = capacity_mask(experts, num_experts, capacity)
        weights = weights * keep  # a dropped assignment adds nothing: its token rides the residual
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
    return Routing(experts=experts, weights=weights, keep=keep, probs=probs, counts=counts,
                   aux_loss=load_balancing_loss(probs, experts), z_loss=router_z_loss(logits))
    # END SOLUTION


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
    # BEGIN SOLUTION
    num_experts = logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be between 1 and the number of experts ({num_experts})")
    probs = torch.softmax(logits.to(softmax_dtype(logits)), dim=-1)  # fp32 even for bf16 logits, as Mixtral does
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (T, k) each, sorted descending
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts, probs
    # END SOLUTION


def switch_routing(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Switch Transformer's router: top-1, weighted by the raw probability p_e(x) (Fedus et al. 2021, eq. 2).

    Returns:
        weights (T, 1) float32, experts (T, 1) int64, probs (T, E) float32.
    """
    # BEGIN SOLUTION
    return top_k_routing(logits, 1, renormalize=False)
    # END SOLUTION


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
    # BEGIN SOLUTION
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0  # no tokens, no imbalance (and no NaN from 0 / 0)
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts)
    fraction = counts.to(probs.dtype) / experts.numel()  # f_i: not differentiable
    mean_prob = probs.mean(dim=0)  # P_i: carries the gradient
    return num_experts * (fraction * mean_prob).sum()
    # END SOLUTION


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """L_z = mean over tokens of logsumexp(logits)^2 (ST-MoE eq. 5), in fp32.

    Args:
        logits: (T, E).

    Returns:
        () float32; 0 when T = 0.
    """
    # BEGIN SOLUTION
    if logits.shape[0] == 0:
        return logits.sum().to(softmax_dtype(logits)) * 0.0
    return torch.logsumexp(logits.to(softmax_dtype(logits)), dim=-1).pow(2).mean()
    # END SOLUTION


# -----------------------------------------------------------------------------
# Capacity and token dropping


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * k * T / E) (GShard, Switch Section 2.2).

    Raises:
        ValueError: a capacity factor <= 0, or non-positive E or k.
    """
    # BEGIN SOLUTION
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor ({capacity_factor}) must be > 0")
    if num_experts <= 0 or top_k <= 0:
        raise ValueError(f"num_experts ({num_experts}) and top_k ({top_k}) must be positive")
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)
    # END SOLUTION


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
    # BEGIN SOLUTION
    by_priority = experts.t().reshape(-1)  # (k T,): slot 0 of every token, then slot 1, ...
    one_hot = torch.nn.functional.one_hot(by_priority, num_experts)  # (k T, E)
    # position of each assignment in its expert's queue: how many earlier assignments chose the same expert
    position = (one_hot.cumsum(dim=0) - 1).gather(1, by_priority[:, None]).squeeze(1)
    keep = position < capacity
    return keep.view(experts.shape[1], experts.shape[0]).t()
    # END SOLUTION


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
    # BEGIN SOLUTION
    num_tokens = logits.shape[0]
    if not 1 <= capacity <= num_tokens:
        raise ValueError(f"expert-choice capacity ({capacity}) must be between 1 and the number of tokens "
                         f"({num_tokens})")
    probs = torch.softmax(logits.to(softmax_dtype(logits)), dim=-1)  # (T, E): each token's scores sum to 1
    gates, token_index = torch.topk(probs.t(), capacity, dim=-1)  # (E, capacity): each expert's column
    return gates, token_index, probs
    # END SOLUTION
