"""MoE arithmetic: parameters against active parameters, all-to-all bytes per layer, and load imbalance.

What it answers: what an MoE model costs in memory (all its parameters), in compute (the parameters a token uses), in
communication (the expert-parallel all-to-alls), and how evenly the router spreads the work.

Parameters of the kit's decoder (common.model) with L blocks, width C, vocabulary V, every MLP an MoE layer of E
SwiGLU experts of width F, top-k routing:

    per block     attention  2 C^2 + 2 C (H_kv D)            norms  2 C       router  E C       experts  E * 3 C F
    total         V C (embedding) + V C (output head, unless tied) + C (final norm) + L * per block
    active        total - L * (E - k) * 3 C F                 a token runs k of the E experts (Mixtral: 47 B / 13 B)

All-to-all bytes of one MoE layer, sent by one rank with T tokens, hidden vectors of C elements of b bytes, over P
expert-parallel ranks, when the routing is uniform (a row stays on its rank with probability 1/P):

    dispatch = combine = T k C b (P - 1) / P       forward: 2 of them; forward and backward: 4

Load imbalance (Switch Transformer, Fedus et al. 2021, arXiv:2101.03961, Section 2.2): max_e counts_e / mean_e
counts_e. 1 is perfect balance; E means every token went to one expert. With expert parallelism the busiest expert
sets the pace of the layer, so its time is imbalance x the balanced time; capacity factors above the imbalance are
needed to drop nothing.

Usage:
    counts = parameter_counts(ModelConfig.preset("tiny"), MoEConfig(num_experts=8, top_k=2, ffn_width=128))
    all_to_all_bytes(num_tokens=4096, width=2048, top_k=2, ep_size=8, bytes_per_element=2)
    load_imbalance(layer.counts)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.model import ModelConfig, Transformer

from .moe_layer import MoEConfig
from .moe_model import apply_moe, train_moe

# -----------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParameterCounts:
    """total: every parameter; active: those one token's forward uses; experts: the expert weights alone."""

    total: int
    active: int
    experts: int


def parameter_counts(model_config: ModelConfig, moe: MoEConfig) -> ParameterCounts:
    """Parameters of common.model's decoder with every MLP replaced by an MoE layer (the formula above).

    Args:
        model_config: the decoder's shape (vocab, width, layers, heads, tied embeddings).
        moe: the MoE layers' E, k and F.

    Returns:
        ParameterCounts; `active` counts k experts per MoE layer (token choice).
    """
    # BEGIN SOLUTION
    C, L, V = model_config.width, model_config.num_layers, model_config.vocab_size
    kv_width = model_config.num_kv_heads * model_config.head_dim
    E, k, F = moe.num_experts, moe.top_k, moe.ffn_width
    expert = 3 * C * F  # W_gate, W_up (C x F each) and W_down (F x C)
    per_block = (2 * C * C + 2 * C * kv_width) + 2 * C + E * C + E * expert
    head = 0 if model_config.tie_embeddings else V * C
    total = V * C + head + C + L * per_block
    return ParameterCounts(total=total, active=total - L * (E - k) * expert, experts=L * E * expert)
    # END SOLUTION


# -----------------------------------------------------------------------------
# Communication


def all_to_all_bytes(*, num_tokens: int, width: int, top_k: int, ep_size: int, bytes_per_element: int,
                     backward: bool = False) -> float:
    """Bytes one rank sends in one MoE layer's all-to-alls, with uniform routing (the formula above).

    Args:
        num_tokens: T, this rank's tokens.
        width: C.
        top_k: k.
        ep_size: P, ranks in the expert-parallel group (P = 1 sends nothing).
        bytes_per_element: b (2 for bf16).
        backward: also count the backward's two all-to-alls.

    Raises:
        ValueError: non-positive sizes (T may be 0).
    """
    # BEGIN SOLUTION
    if width < 1 or top_k < 1 or ep_size < 1 or bytes_per_element < 1 or num_tokens < 0:
        raise ValueError(f"sizes must be positive: T={num_tokens}, C={width}, k={top_k}, P={ep_size}, "
                         f"b={bytes_per_element}")
    one = num_tokens * top_k * width * bytes_per_element * (ep_size - 1) / ep_size  # rows that leave this rank
    return one * (4 if backward else 2)
    # END SOLUTION


# -----------------------------------------------------------------------------
# Load imbalance


def load_imbalance(counts: torch.Tensor) -> float:
    """max / mean of the tokens per expert.

    Args:
        counts: (E,) tokens routed to each expert (any numeric dtype), or (L, E) for L layers: then the mean of the
            layers' imbalances.

    Returns:
        >= 1.0.

    Raises:
        ValueError: no token routed at all (in some layer), or counts that are not 1-D or 2-D.
    """
    # BEGIN SOLUTION
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() not in (1, 2):
        raise ValueError(f"counts must be (E,) or (L, E), got shape {tuple(counts.shape)}")
    rows = counts.reshape(-1, counts.shape[-1])  # (L, E)
    totals = rows.sum(dim=-1)
    if bool((totals <= 0).any()):
        raise ValueError("load_imbalance: no token was routed, so the imbalance is undefined")
    return float((rows.max(dim=-1).values / (totals / rows.shape[-1])).mean())
    # END SOLUTION


def imbalance_study(aux_loss_coefs: list[float], *, steps: int = 60, num_experts: int = 8, top_k: int = 2,
                    seed: int = 0) -> dict[float, list[float]]:
    """Train the tiny MoE decoder once per aux_loss_coef and record the load imbalance at every step.

    The same initial weights and batches for every run; a router initialised 10x larger than usual starts the
    runs unbalanced, so the effect of the balancing loss shows within tens of steps on a CPU. (Given: it only runs
    your apply_moe, train_moe and load_imbalance.)

    Returns:
        {coef: [imbalance per step, averaged over the layers]}.
    """
    curves = {}
    for coef in aux_loss_coefs:
        torch.manual_seed(seed)
        model = Transformer(ModelConfig.preset("tiny", max_seq_len=64))
        config = MoEConfig(num_experts=num_experts, top_k=top_k, ffn_width=64, aux_loss_coef=coef, backend="torch")
        apply_moe(model, config=config)
        with torch.no_grad():
            for block in model.blocks:
                block.mlp.router.weight.mul_(10.0)  # a confident, unbalanced router to start from
        history = train_moe(model, steps=steps, batch_size=8, seq_len=64, lr=3e-3, seed=seed)
        curves[coef] = [load_imbalance(torch.tensor(step)) for step in history["counts"]]
    return curves
