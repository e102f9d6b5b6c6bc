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
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: parameter_counts is not implemented yet (lab09_moe/arithmetic.py)")


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
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: all_to_all_bytes is not implemented yet (lab09_moe/arithmetic.py)")


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
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: load_imbalance is not implemented yet (lab09_moe/arithmetic.py)")


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
