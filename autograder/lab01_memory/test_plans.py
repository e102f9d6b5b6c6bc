"""Lab 01, part 2: checkpoint plans over the model's blocks (plans.py)."""

import copy

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(3)
@pytest.mark.parametrize(
    "num_blocks, plan, expected",
    [
        (6, dict(plan="none"), []),
        (6, dict(plan="every_k", k=1), [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]),
        (7, dict(plan="every_k", k=3), [(0, 1), (3, 4), (6, 7)]),
        (5, dict(plan="segments", num_segments=2), [(0, 3), (3, 5)]),
        (7, dict(plan="segments", num_segments=7), [(i, i + 1) for i in range(7)]),
        (9, dict(plan="sqrt"), [(0, 3), (3, 6), (6, 9)]),
        (12, dict(plan="sqrt"), [(0, 4), (4, 8), (8, 12)]),
        (1, dict(plan="sqrt"), [(0, 1)]),
    ],
)
def test_plan_segments(num_blocks, plan, expected):
    """plan_segments returns the documented segments for each plan."""
    from lab01_memory.plans import CheckpointConfig, plan_segments

    got = plan_segments(num_blocks, CheckpointConfig(**plan))
    assert [tuple(s) for s in got] == expected, (
        f"plan_segments(num_blocks={num_blocks}, {plan}) returned {got}, expected {expected}"
    )


@pytest.mark.points(1)
def test_more_segments_than_blocks_is_an_error():
    from lab01_memory.plans import CheckpointConfig, plan_segments

    with pytest.raises(ValueError, match="segments"):
        plan_segments(3, CheckpointConfig(plan="segments", num_segments=4))
    with pytest.raises(ValueError, match="k"):
        CheckpointConfig(plan="every_k", k=0)
    with pytest.raises(ValueError, match="plan"):
        CheckpointConfig(plan="everything")


@pytest.mark.points(4)
@pytest.mark.parametrize("plan", [dict(plan="every_k", k=2), dict(plan="sqrt"), dict(plan="segments", num_segments=3)])
def test_model_gradients_match_with_dropout(plan, make_model, make_batch, grads):
    """A checkpointed model (dropout 0.2, fp64) has exactly the gradients of the plain model."""
    from lab01_memory.plans import CheckpointConfig, apply_checkpointing

    model = make_model(num_layers=5, dropout=0.2)
    planned = apply_checkpointing(copy.deepcopy(model), config=CheckpointConfig(**plan))
    tokens, targets = make_batch()
    torch.manual_seed(123)
    model.loss(tokens, targets).backward()
    torch.manual_seed(123)
    planned.loss(tokens, targets).backward()
    expected, got = grads(model), grads(planned)
    assert got.keys() == expected.keys(), f"apply_checkpointing({plan}): parameters without gradient: " \
                                          f"{sorted(expected.keys() - got.keys())}"
    for name in expected:
        check_close(got[name], expected[name], name=f"apply_checkpointing({plan}) gradient of {name}",
                    inputs=describe(tokens=tokens, num_layers=5, dropout=0.2))


@pytest.mark.points(2)
def test_each_checkpointed_block_runs_twice(make_model, make_batch):
    """Blocks in a segment run once in forward and once in the recompute; other blocks run once."""
    from lab01_memory.plans import CheckpointConfig, apply_checkpointing

    model = apply_checkpointing(make_model(num_layers=6), config=CheckpointConfig(plan="every_k", k=2))
    counts = [0] * 6
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, index=index: counts.__setitem__(index, counts[index] + 1))
    tokens, targets = make_batch()
    model.loss(tokens, targets).backward()
    expected = [2, 1, 2, 1, 2, 1]
    assert counts == expected, f"apply_checkpointing(every_k, k=2) ran blocks {counts} times, expected {expected}"
