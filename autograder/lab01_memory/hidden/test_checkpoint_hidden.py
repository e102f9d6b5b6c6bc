"""Lab 01 hidden tests (checkpoint): the same ideas on inputs the public tests do not show."""

import copy

import pytest
import torch

from common.testing import check_close, describe, random_tensor

@pytest.mark.points(2)
def test_checkpoint_with_tuple_output():
    """A checkpointed function may return a tuple; gradients flow through every element, including unused ones."""
    from lab01_memory.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 7).double()

    def two_outputs(x):
        h = torch.sin(layer(x))
        return h * 2, h.sum(dim=-1)

    x = random_tensor(3, 7, dtype=torch.float64, seed=1).requires_grad_(True)
    a, b = checkpoint(two_outputs, x)
    (a.pow(2).sum() + b.sum()).backward()
    dx, dw = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    a, b = two_outputs(x)
    (a.pow(2).sum() + b.sum()).backward()
    check_close(dx, x.grad, name="checkpoint with a tuple output (gradient of x)", inputs=describe(x=x))
    check_close(dw, layer.weight.grad, name="checkpoint with a tuple output (weight gradient)", inputs=describe(x=x))
