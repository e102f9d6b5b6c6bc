"""Lab 01 hidden tests (accumulation): the same ideas on inputs the public tests do not show."""

import copy

import pytest
import torch

from common.testing import check_close, describe, random_tensor

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
