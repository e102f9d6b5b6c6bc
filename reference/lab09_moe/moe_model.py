"""An MoE decoder: the kit's Llama-style model with MoE layers in place of its MLPs, and a loop that trains it.

What it saves: compute for a given parameter count. Each block's SwiGLU MLP becomes an MoELayer (moe_layer.py) of E
experts of width F, of which each token uses k, as in Mixtral (Jiang et al. 2024, arXiv:2401.04088) and the Switch
Transformer (Fedus et al. 2021, arXiv:2101.03961, which replaces every other MLP; here every block's is replaced).
The block itself is unchanged, h + MoE(RMSNorm(h)), so a token that capacity drops passes through the residual.

The training loss adds the routers' losses, summed over the MoE layers (Switch Section 2.2, ST-MoE eq. 6):

    L = cross_entropy + aux_loss_coef * sum_layers L_aux + z_loss_coef * sum_layers L_z

Usage:
    model = apply_moe(Transformer(ModelConfig.preset("tiny")), config=MoEConfig(num_experts=4, top_k=2, ffn_width=64))
    loss = moe_loss(model, tokens, targets)
    history = train_moe(model, steps=100, batch_size=8, seq_len=64, lr=3e-3, seed=0)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from common.data import batches, load_corpus, split_corpus
from common.model import Transformer

from .moe_layer import MoEConfig, MoELayer

# -----------------------------------------------------------------------------
# Public entry points


def apply_moe(model: Transformer, *, config: MoEConfig) -> Transformer:
    """Replace every block's MLP with a fresh MoELayer (in place, in the model's dtype and device); returns `model`.

    Args:
        model: common.model.Transformer.
        config: the MoE layers' shape and routing.
    """
    # BEGIN SOLUTION
    reference = model.embed.weight
    for block in model.blocks:
        block.mlp = MoELayer(model.config.width, config).to(device=reference.device, dtype=reference.dtype)
    return model
    # END SOLUTION


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers (expert-parallel ones included), in module order."""
    # BEGIN SOLUTION
    return [module for module in model.modules() if isinstance(module, MoELayer)]
    # END SOLUTION


def moe_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Cross-entropy plus the routers' losses, weighted by each layer's config.

    Args:
        model: a Transformer with MoE layers (apply_moe).
        tokens, targets: (B, N) int64.

    Returns:
        (loss, parts): the scalar to back-propagate, and {"ce", "aux", "z"} as Python floats (aux and z summed over
        the layers, before their coefficients).
    """
    # BEGIN SOLUTION
    ce = model.loss(tokens, targets)
    total, aux_sum, z_sum = ce, 0.0, 0.0
    for layer in moe_layers(model):
        total = total + layer.config.aux_loss_coef * layer.aux_loss + layer.config.z_loss_coef * layer.z_loss
        aux_sum += layer.aux_loss.item()
        z_sum += layer.z_loss.item()
    return total, {"ce": ce.item(), "aux": aux_sum, "z": z_sum}
    # END SOLUTION


def train_moe(model: Transformer, *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int = 0,
              max_tokens: int | None = 100_000) -> dict[str, list]:
    """Train on the embedded corpus with AdamW and record the loss and the load of every MoE layer.

    Args:
        model: a Transformer with MoE layers.
        steps, batch_size, seq_len, lr: the run (weight decay 0, betas (0.9, 0.95)).
        seed: the batches' seed.
        max_tokens: use only the corpus's first tokens (None: all of it).

    Returns:
        {"loss": [total per step], "ce": [...], "aux": [...], "counts": [per step, per layer, the (E,) counts as
        lists]}.
    """
    # BEGIN SOLUTION
    train, _ = split_corpus(load_corpus(max_tokens=max_tokens))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history: dict[str, list] = {"loss": [], "ce": [], "aux": [], "counts": []}
    model.train()
    for tokens, targets in batches(train, batch_size=batch_size, seq_len=seq_len, seed=seed, num_batches=steps):
        loss, parts = moe_loss(model, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        history["ce"].append(parts["ce"])
        history["aux"].append(parts["aux"])
        history["counts"].append([layer.counts.tolist() for layer in moe_layers(model)])
    return history
    # END SOLUTION
