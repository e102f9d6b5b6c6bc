"""What lab 09's tests expect, computed in the grader: plain float64 loops over tokens and experts, written from the
papers' formulas (never from the lab's code), plus the seeded inputs that producers and tests share.

Nothing here imports the lab. Producers (in the worker) use only the input builders; the tests use the rest.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.testing import random_tensor

# -----------------------------------------------------------------------------
# Seeded inputs


def moe_weights(*, num_experts: int, width: int, ffn_width: int, seed: int, scale: float = 0.4) -> dict:
    """A MoE layer's state dict in the lab's layout: router.weight (E, C), w_gate_up (E, C, 2F), w_down (E, F, C)."""
    E, C, F_ = num_experts, width, ffn_width
    return {"router.weight": random_tensor(E, C, dtype=torch.float64, seed=seed, scale=scale),
            "w_gate_up": random_tensor(E, C, 2 * F_, dtype=torch.float64, seed=seed + 1, scale=scale),
            "w_down": random_tensor(E, F_, C, dtype=torch.float64, seed=seed + 2, scale=scale)}


# -----------------------------------------------------------------------------
# Routing, one token at a time


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the experts, float64, differentiable."""
    logits = logits.double()
    shifted = logits - logits.max(dim=-1, keepdim=True).values.detach()
    exps = shifted.exp()
    return exps / exps.sum(dim=-1, keepdim=True)


def ranked_experts(probs: torch.Tensor, top_k: int) -> list[list[int]]:
    """Each token's top_k experts, best first (the tests' inputs have no ties)."""
    table = probs.detach().tolist()
    return [sorted(range(len(row)), key=lambda e: -row[e])[:top_k] for row in table]


def kept_by_capacity(choices: list[list[int]], num_experts: int, capacity: int | None) -> list[list[bool]]:
    """Serve every token's first choice (in token order), then every second choice...; an expert takes `capacity`."""
    keep = [[True] * len(row) for row in choices]
    if capacity is None:
        return keep
    served = [0] * num_experts
    for slot in range(len(choices[0]) if choices else 0):
        for token, row in enumerate(choices):
            expert = row[slot]
            keep[token][slot] = served[expert] < capacity
            served[expert] += 1
    return keep


def capacity_of(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """ceil(cf k T / E), in exact rational arithmetic (the tests use factors whose product is not near an integer
    or is exactly one)."""
    return math.ceil(Fraction(capacity_factor).limit_denominator(10_000) * top_k * num_tokens / num_experts)


def combine_matrix(logits: torch.Tensor, *, top_k: int, renormalize: bool = True,
                   capacity_factor: float | None = None, routing: str = "token_choice") -> torch.Tensor:
    """(T, E) float64: the weight with which each token receives each expert's output (0 if not routed or
    dropped); differentiable in the logits."""
    probs = probabilities(logits)
    T, E = probs.shape
    rows = []
    if routing == "expert_choice":
        capacity = min(capacity_of(T, E, top_k, capacity_factor or 1.0), T)
        picked = [sorted(range(T), key=lambda t: -probs[t, e].item())[:capacity] for e in range(E)]
        mask = torch.zeros(T, E, dtype=torch.float64)
        for e, tokens in enumerate(picked):
            mask[tokens, e] = 1.0
        return probs * mask
    choices = ranked_experts(probs, top_k)
    capacity = None if capacity_factor is None else capacity_of(T, E, top_k, capacity_factor)
    keep = kept_by_capacity(choices, E, capacity)
    for t in range(T):
        chosen = sum(probs[t, e] for e in choices[t])
        row = [torch.zeros((), dtype=torch.float64) for _ in range(E)]
        for slot, e in enumerate(choices[t]):
            if keep[t][slot]:
                row[e] = probs[t, e] / chosen if renormalize else probs[t, e]
        rows.append(torch.stack(row))
    return torch.stack(rows) if rows else torch.zeros(0, E, dtype=torch.float64)


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * sum_i f_i P_i with f_i = share of the k T assignments (before dropping), P_i = mean probability."""
    probs = probabilities(logits)
    T, E = probs.shape
    if T == 0:
        return torch.zeros((), dtype=torch.float64)
    tally = [0] * E
    for row in ranked_experts(probs, top_k):
        for e in row:
            tally[e] += 1
    share = torch.tensor(tally, dtype=torch.float64) / (top_k * T)
    return E * sum(share[i] * probs[:, i].mean() for i in range(E))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of (log sum_i exp(logit_i))^2."""
    logits = logits.double()
    if logits.shape[0] == 0:
        return torch.zeros((), dtype=torch.float64)
    peak = logits.max(dim=-1).values.detach()
    lse = peak + (logits - peak[:, None]).exp().sum(dim=-1).log()
    return (lse * lse).mean()


# -----------------------------------------------------------------------------
# The MoE layer as a dense loop: every expert on every token, weighted by the combine matrix


def swiglu_expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert on all rows: (silu(x Wg) * (x Wu)) Wd, with Wg, Wu the two halves of w_gate_up (C, 2F)."""
    half = w_down.shape[0]
    gate, up = x @ w_gate_up[:, :half], x @ w_gate_up[:, half:]
    return (gate * torch.sigmoid(gate) * up) @ w_down


def dense_moe(x: torch.Tensor, weights: dict, **routing) -> torch.Tensor:
    """The layer on x (T, C), float64, differentiable in x and in every tensor of `weights`."""
    combine = combine_matrix(x @ weights["router.weight"].t(), **routing)  # (T, E)
    out = torch.zeros_like(x)
    for e in range(weights["w_gate_up"].shape[0]):
        out = out + combine[:, e:e + 1] * swiglu_expert(x, weights["w_gate_up"][e], weights["w_down"][e])
    return out


class DenseMoE(nn.Module):
    """The grader's MoE layer (float64): parameters named like the lab's, forward by `dense_moe`; keeps its losses."""

    def __init__(self, weights: dict, *, top_k: int, renormalize: bool = True, capacity_factor: float | None = None,
                 routing: str = "token_choice"):
        super().__init__()
        self.router = nn.Linear(weights["router.weight"].shape[1], weights["router.weight"].shape[0], bias=False)
        self.router.weight = nn.Parameter(weights["router.weight"].clone())
        self.w_gate_up = nn.Parameter(weights["w_gate_up"].clone())
        self.w_down = nn.Parameter(weights["w_down"].clone())
        self.options = dict(top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor, routing=routing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = flat @ self.router.weight.t()
        self.aux = balance_loss(logits, self.options["top_k"]) if self.options["routing"] == "token_choice" \
            else torch.zeros((), dtype=torch.float64)
        self.z = z_loss(logits)
        params = {"router.weight": self.router.weight, "w_gate_up": self.w_gate_up, "w_down": self.w_down}
        return dense_moe(flat, params, **self.options).reshape(x.shape)


def model_state(*, num_layers: int, num_experts: int, ffn_width: int, seed: int) -> dict:
    """A tiny fp64 decoder's state dict (common.testing.tiny_model) with MoE weights in place of every MLP."""
    from common.testing import tiny_model

    model = tiny_model(num_layers=num_layers, seed=seed)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i in range(num_layers):
        layer = moe_weights(num_experts=num_experts, width=model.config.width, ffn_width=ffn_width,
                            seed=seed * 100 + 10 * i, scale=0.1)
        state.update({f"blocks.{i}.mlp.{name}": value for name, value in layer.items()})
    return state


def dense_moe_model(state: dict, *, num_layers: int, **routing):
    """The grader's MoE decoder: tiny_model with a DenseMoE in every block, loaded from `state`."""
    from common.testing import tiny_model

    model = tiny_model(num_layers=num_layers)
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}.mlp."
        block.mlp = DenseMoE({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, **routing)
    model.load_state_dict(state)
    return model


def model_loss(model, tokens, targets, *, aux_loss_coef: float, z_loss_coef: float) -> torch.Tensor:
    """Cross-entropy + the coefficients times the routers' losses summed over the layers (the grader's model)."""
    logits = model(tokens).double()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    layers = [block.mlp for block in model.blocks]
    return ce + aux_loss_coef * sum(m.aux for m in layers) + z_loss_coef * sum(m.z for m in layers)
