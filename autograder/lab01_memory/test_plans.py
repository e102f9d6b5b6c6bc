"""Lab 01, part 2: checkpoint plans over the model's blocks (plans.py)."""

import math

import pytest
import torch

from common.testing import check_all_close, corpus_batch, describe, gradients, tiny_model

# -----------------------------------------------------------------------------
# Producers: run in the worker


def segments_of(num_blocks: int, plan: dict):
    from lab01_memory.plans import CheckpointConfig, plan_segments

    return [tuple(s) for s in plan_segments(num_blocks, CheckpointConfig(**plan))]


def even_segments_of(num_blocks: int, num_segments: int):
    from lab01_memory.plans import even_segments

    return [tuple(s) for s in even_segments(num_blocks, num_segments)]


def config_error(plan: dict) -> None:
    from lab01_memory.plans import CheckpointConfig

    CheckpointConfig(**plan)


def segments_error(num_blocks: int, plan: dict) -> None:
    from lab01_memory.plans import CheckpointConfig, plan_segments

    plan_segments(num_blocks, CheckpointConfig(**plan))


def planned_gradients(plan: dict, *, num_layers: int, dropout: float, model_seed: int, batch: dict,
                      rng_seed: int) -> dict:
    """Loss and gradients of the tiny fp64 model with apply_checkpointing(plan), and the block-call counts."""
    from lab01_memory.plans import CheckpointConfig, apply_checkpointing

    model = tiny_model(num_layers=num_layers, dropout=dropout, seed=model_seed)
    names_before = [name for name, _ in model.named_parameters()]
    planned = apply_checkpointing(model, config=CheckpointConfig(**plan))
    counts = [0] * num_layers
    for index, block in enumerate(planned.blocks):
        block.register_forward_hook(lambda m, a, o, index=index: counts.__setitem__(index, counts[index] + 1))
    tokens, targets = corpus_batch(**batch)
    torch.manual_seed(rng_seed)
    loss = planned.loss(tokens, targets)
    loss.backward()
    return {"loss": loss.detach(), "grads": gradients(planned), "counts": counts,
            "same_model": planned is model, "names": [name for name, _ in planned.named_parameters()],
            "names_before": names_before}


def _plain_gradients(*, num_layers: int, dropout: float, model_seed: int, batch: dict, rng_seed: int) -> dict:
    model = tiny_model(num_layers=num_layers, dropout=dropout, seed=model_seed)
    tokens, targets = corpus_batch(**batch)
    torch.manual_seed(rng_seed)
    loss = model.loss(tokens, targets)
    loss.backward()
    return {"loss": loss.detach(), "grads": gradients(model)}


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _sqrt_plan(num_blocks: int) -> list[tuple[int, int]]:
    """round(sqrt(L)) segments, sizes differing by at most one, the longer ones first (the documented plan)."""
    count = max(1, round(math.sqrt(num_blocks)))
    sizes = [num_blocks // count + (i < num_blocks % count) for i in range(count)]
    return [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(count)]


@pytest.mark.points(3)
@pytest.mark.parametrize(
    "num_blocks, plan, expected",
    [
        (6, dict(plan="none"), []),
        (6, dict(plan="every_k", k=1), [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]),
        (7, dict(plan="every_k", k=3), [(0, 1), (3, 4), (6, 7)]),
        (8, dict(plan="every_k", k=3), [(0, 1), (3, 4), (6, 7)]),
        (2, dict(plan="every_k", k=5), [(0, 1)]),
        (5, dict(plan="segments", num_segments=2), [(0, 3), (3, 5)]),
        (7, dict(plan="segments", num_segments=3), [(0, 3), (3, 5), (5, 7)]),
        (7, dict(plan="segments", num_segments=7), [(i, i + 1) for i in range(7)]),
        (1, dict(plan="segments", num_segments=1), [(0, 1)]),
        (9, dict(plan="sqrt"), [(0, 3), (3, 6), (6, 9)]),
        (1, dict(plan="sqrt"), [(0, 1)]),
    ],
)
def test_plan_segments(student, num_blocks, plan, expected):
    """plan_segments returns the documented segments for each plan, with config fields away from their defaults."""
    got = student.run(segments_of, num_blocks, plan)
    assert got == expected, f"plan_segments(num_blocks={num_blocks}, {plan}) returned {got}, expected {expected}"


@pytest.mark.points(2)
@pytest.mark.parametrize("num_blocks", [2, 6, 7, 13, 20])
def test_sqrt_plan_rounds_to_nearest(student, num_blocks):
    """The sqrt plan uses round(sqrt(L)) segments: sizes where floor, round and ceil disagree (2: 1 vs 2; 6: 2 vs 3;
    7 and 13: round up; 20: 4 vs 5) tell them apart."""
    expected = _sqrt_plan(num_blocks)
    got = student.run(segments_of, num_blocks, dict(plan="sqrt"))
    assert got == expected, (
        f"plan_segments(num_blocks={num_blocks}, sqrt) returned {got}, expected {expected}: "
        f"round(sqrt({num_blocks})) = {round(math.sqrt(num_blocks))} segments of nearly equal size, longer ones first")


@pytest.mark.points(1)
@pytest.mark.parametrize("num_blocks, num_segments", [(10, 4), (11, 3), (3, 3)])
def test_even_segments_puts_the_extra_blocks_first(student, num_blocks, num_segments):
    sizes = [num_blocks // num_segments + (i < num_blocks % num_segments) for i in range(num_segments)]
    expected = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(num_segments)]
    got = student.run(even_segments_of, num_blocks, num_segments)
    assert got == expected, f"even_segments({num_blocks}, {num_segments}) returned {got}, expected {expected}"


@pytest.mark.points(2)
def test_every_documented_error(student):
    """More segments than blocks, k < 1, num_segments < 1 and an unknown plan each raise ValueError."""
    with pytest.raises(ValueError, match="segments"):
        student.run(segments_error, 3, dict(plan="segments", num_segments=4))
    with pytest.raises(ValueError, match="k"):
        student.run(config_error, dict(plan="every_k", k=0))
    with pytest.raises(ValueError, match="num_segments"):
        student.run(config_error, dict(plan="segments", num_segments=0))
    with pytest.raises(ValueError, match="plan"):
        student.run(config_error, dict(plan="everything"))
    with pytest.raises(ValueError, match="num_blocks"):
        student.run(segments_error, 0, dict(plan="sqrt"))


@pytest.mark.points(4)
@pytest.mark.parametrize("plan", [dict(plan="every_k", k=2), dict(plan="sqrt"), dict(plan="segments", num_segments=3),
                                  dict(plan="none")])
def test_model_gradients_match_with_dropout(student, plan):
    """A checkpointed model (5 blocks, dropout 0.2, fp64) has exactly the loss and gradients of the plain model."""
    case = dict(num_layers=5, dropout=0.2, model_seed=0, batch=dict(batch_size=3, seq_len=16, seed=0), rng_seed=123)
    got = student.run(planned_gradients, plan, **case)
    want = _plain_gradients(**case)
    inputs = describe(plan=plan, num_layers=5, dropout=0.2, tokens=(3, 16))
    check_all_close({"loss": got["loss"]}, {"loss": want["loss"]}, name="apply_checkpointing: loss", inputs=inputs)
    check_all_close(got["grads"], want["grads"], name="apply_checkpointing: gradients", inputs=inputs)
    assert got["names"] == got["names_before"], "apply_checkpointing must keep the parameters and their names"


@pytest.mark.points(2)
@pytest.mark.parametrize("plan, expected", [
    (dict(plan="every_k", k=2), [2, 1, 2, 1, 2, 1]),
    (dict(plan="segments", num_segments=4), [2, 2, 2, 2, 2, 2]),
    (dict(plan="none"), [1, 1, 1, 1, 1, 1]),
])
def test_each_checkpointed_block_runs_twice(student, plan, expected):
    """Blocks in a segment run once in forward and once in the recompute; other blocks run once. The model is
    changed in place and returned."""
    got = student.run(planned_gradients, plan, num_layers=6, dropout=0.0, model_seed=1,
                      batch=dict(batch_size=2, seq_len=8, seed=1), rng_seed=0)
    assert got["counts"] == expected, f"apply_checkpointing({plan}) ran blocks {got['counts']} times, expected {expected}"
    assert got["same_model"], "apply_checkpointing must return the model it was given (it installs a block runner)"
