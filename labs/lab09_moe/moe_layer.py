"""The Mixture-of-Experts layer: router, dispatch, grouped SwiGLU experts, weighted combine.

What it saves: FLOPs per parameter. The layer holds E SwiGLU experts of width F but runs each token through k of
them, so it has E / k times the parameters of the MLP it costs to run (Mixtral 8x7B: 47 B parameters, 13 B active
per token; Jiang et al. 2024, arXiv:2401.04088). The sparsely gated layer of Shazeer et al. 2017 (arXiv:1701.06538):

    logits = x W_r^T                                  (T, E)   the router, a linear layer without bias
    (e_j, w_j) = top-k of softmax(logits)             router.py (Mixtral renormalises the k weights)
    y(x) = sum_j w_j * SwiGLU_{e_j}(x)                dispatch.py sorts by expert, grouped_gemm.py runs the experts

With a capacity factor, assignments past an expert's capacity are dropped; a token that loses all of them leaves
the layer as 0 and passes through the block's residual connection, h + MoE(norm(h)) = h. With expert-choice routing
each expert takes its `capacity` best tokens instead (Zhou et al. 2022, arXiv:2202.09368).

After each forward the layer keeps what the training loss and the measurements need: `aux_loss` (Switch eq. 4) and
`z_loss` (ST-MoE eq. 5) as tensors with gradients, and `counts` (E,), the assignments routed to each expert.

Weights, and how Hugging Face's Mixtral stores the same ones (`load_mixtral_weights` converts):

    router.weight  (E, C)         = MixtralSparseMoeBlock.gate.weight
    w_gate_up      (E, C, 2F)     = experts.gate_up_proj (E, 2F, C) transposed: [:, :, :F] gate, [:, :, F:] up
    w_down         (E, F, C)      = experts.down_proj (E, C, F) transposed

Usage:
    layer = MoELayer(width=64, config=MoEConfig(num_experts=8, top_k=2, ffn_width=128))
    y = layer(x)                                  # x (B, N, C) or (T, C)
    loss = task_loss + 0.01 * layer.aux_loss + 1e-3 * layer.z_loss
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .dispatch import Dispatch, make_dispatch, permute, unpermute
from .grouped_gemm import expert_mlp
from .router import expert_capacity, expert_choice_routing, route, router_z_loss

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer's shape and routing. Letters follow the kit: E experts, C width, F each expert's FFN width.

    num_experts: E >= 1.
    top_k: k experts per token, 1 <= k <= E (token choice); with expert choice, the average experts per token.
    ffn_width: F of each expert's SwiGLU.
    renormalize: Mixtral's renormalised top-k weights (True) or the Switch router's raw probabilities (False).
    capacity_factor: None for no capacity limit (token choice); each expert keeps ceil(cf * k * T / E) assignments.
        Expert choice always uses a capacity (None means 1.0).
    routing: "token_choice" or "expert_choice".
    aux_loss_coef: alpha of the load-balancing loss (Switch uses 0.01); the model's loss adds alpha * aux_loss.
    z_loss_coef: weight of the router z-loss (ST-MoE uses 0.001).
    backend: "triton" (the grouped GEMM) or "torch" (one matmul per expert: CPU training, and the reference).
    """

    num_experts: int = 8
    top_k: int = 2
    ffn_width: int = 128
    renormalize: bool = True
    capacity_factor: float | None = None
    routing: str = "token_choice"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    backend: str = "triton"

    def __post_init__(self) -> None:
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: MoEConfig.__post_init__ is not implemented yet (lab09_moe/moe_layer.py)")


# -----------------------------------------------------------------------------
# The layer


class MoELayer(nn.Module):
    """Router + E SwiGLU experts; forward(x) has x's shape. See the module docstring for the weights' layout."""

    def __init__(self, width: int, config: MoEConfig):
        super().__init__()
        self.width, self.config = width, config
        E, F = config.num_experts, config.ffn_width
        self.router = nn.Linear(width, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, width, 2 * F))
        self.w_down = nn.Parameter(torch.empty(E, F, width))
        for weight in (self.router.weight, self.w_gate_up, self.w_down):
            nn.init.normal_(weight, mean=0.0, std=0.02)  # the kit's model initialises its linears the same way
        self.aux_loss: torch.Tensor | None = None  # set by forward
        self.z_loss: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = sum over each token's experts of w_j * SwiGLU_{e_j}(x).

        Args:
            x: (..., C) in the layer's dtype.

        Returns:
            (..., C) in x's dtype; zero rows for tokens whose every assignment was dropped.

        Raises:
            ValueError: the last dimension is not the layer's width.
            TypeError: x's dtype is not the layer's parameters' dtype.
        """
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: MoELayer.forward is not implemented yet (lab09_moe/moe_layer.py)")

    def plan(self, logits: torch.Tensor) -> tuple[Dispatch, torch.Tensor]:
        """Route (token or expert choice), record the losses and counts, and return (dispatch plan, weights).

        The weights are indexed by plan.assignment: (T, k) for token choice, (E, capacity) for expert choice.
        """
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: MoELayer.plan is not implemented yet (lab09_moe/moe_layer.py)")


# -----------------------------------------------------------------------------
# Hugging Face's Mixtral block


@torch.no_grad()
def load_mixtral_weights(layer: MoELayer, state_dict: dict[str, torch.Tensor]) -> MoELayer:
    """Copy a `MixtralSparseMoeBlock`'s weights (transformers 5.x names and layouts) into `layer`, in place.

    Args:
        layer: an MoELayer whose E, C, F match the block's.
        state_dict: the block's `state_dict()`: "gate.weight" (E, C), "experts.gate_up_proj" (E, 2F, C),
            "experts.down_proj" (E, C, F).

    Returns:
        layer, for chaining.

    Raises:
        KeyError: a missing entry. ValueError: shapes that do not match the layer.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: load_mixtral_weights is not implemented yet (lab09_moe/moe_layer.py)")
