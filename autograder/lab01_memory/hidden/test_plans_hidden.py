"""Lab 01 hidden tests (plans): the same ideas on inputs the public tests do not show."""

import copy

import pytest
import torch

from common.testing import check_close, describe, random_tensor  # noqa: F401

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
