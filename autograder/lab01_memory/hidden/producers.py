"""Producers of lab 01's hidden tests. The hidden worker imports this module; the hidden test files (with what is
expected) stay in the grader."""

import torch

from common.testing import random_tensor


def tuple_output_gradients(seed: int, use_checkpoint: bool) -> dict:
    """A function returning a tuple (one part used twice, one summed): gradients flow through every element."""
    if use_checkpoint:
        from lab01_memory.checkpoint import checkpoint
    torch.manual_seed(seed)
    layer = torch.nn.Linear(7, 7).double()

    def two_outputs(x):
        h = torch.sin(layer(x))
        return h * 2, h.sum(dim=-1)

    x = random_tensor(3, 7, dtype=torch.float64, seed=seed + 1).requires_grad_(True)
    a, b = checkpoint(two_outputs, x) if use_checkpoint else two_outputs(x)
    (a.pow(2).sum() + b.sum()).backward()
    return {"dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad}


def model_under_no_grad(plan: dict) -> dict:
    """A checkpointed model evaluated under torch.no_grad gives the plain model's logits and saves nothing."""
    from common.testing import corpus_batch, tiny_model
    from lab01_memory.plans import CheckpointConfig, apply_checkpointing

    model = tiny_model(num_layers=3, seed=8)
    tokens, _ = corpus_batch(batch_size=2, seq_len=10, seed=8)
    with torch.no_grad():
        plain = model(tokens)
        planned = apply_checkpointing(model, config=CheckpointConfig(**plan))
        logits = planned(tokens)
    return {"plain": plain, "planned": logits}
