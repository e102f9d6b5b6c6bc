"""Lab 01 hidden tests: the same ideas on inputs the public tests do not show."""

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


@pytest.mark.points(2)
def test_odd_depth_segments_match(make_model, make_batch, grads):
    """7 blocks in 3 uneven segments, dropout on: gradients equal the plain model's."""
    from lab01_memory.plans import CheckpointConfig, apply_checkpointing

    model = make_model(num_layers=7, dropout=0.3, seed=4)
    planned = apply_checkpointing(copy.deepcopy(model), config=CheckpointConfig(plan="segments", num_segments=3))
    tokens, targets = make_batch(batch_size=2, seq_len=11, seed=9)
    for m in (model, planned):
        torch.manual_seed(77)
        m.loss(tokens, targets).backward()
    expected, got = grads(model), grads(planned)
    for name in expected:
        check_close(got[name], expected[name], name=f"segments=3 over 7 blocks ({name})", inputs=describe(tokens=tokens))


@pytest.mark.points(1)
def test_microbatch_with_no_valid_tokens(make_model, make_batch, grads):
    """A micro-batch that is all padding contributes nothing, and the result is still the large-batch gradient."""
    from lab01_memory.accumulation import accumulate_gradients

    model = make_model(num_layers=2, seed=2)
    tokens, targets = make_batch(batch_size=4, seq_len=12, seed=6)
    targets = targets.clone()
    targets[2:] = -100
    model.loss(tokens, targets).backward()
    expected = grads(model)
    model.zero_grad()
    accumulate_gradients(model, tokens, targets, num_microbatches=2)
    got = grads(model)
    for name in expected:
        check_close(got[name], expected[name], name=f"accumulate_gradients with an all-padding micro-batch ({name})",
                    inputs=describe(tokens=tokens))
