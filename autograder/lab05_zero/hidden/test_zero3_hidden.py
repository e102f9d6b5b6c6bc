"""Lab 05 hidden tests (ZeRO-3): three ranks without prefetch; one unit."""

import pytest

from common.testing import describe


@pytest.mark.points(2)
@pytest.mark.time_limit(240)
def test_zero3_three_ranks_without_prefetch(student):
    """Three ranks, prefetch off, two micro-batches: still single-process training."""
    from autograder.lab05_zero.workers import check_training, expected_training, train

    spec = {"config": {"stage": 3, "prefetch": False}, "steps": 2, "micro": 2, "seed": 43}
    results = student.run(train, [spec], 3, timeout_s=200)[0]
    want = expected_training(steps=2, world_size=3, micro=2, seed=43)
    check_training(results, want, name="ZeRO3", inputs=describe(stage=3, world_size=3, prefetch=False))


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_zero3_whole_model_as_one_unit(student):
    """units=[]: the root unit holds everything; gathered once per forward, freed after each backward and eval."""
    from autograder.lab05_zero.workers import train_local

    spec = {"config": {"stage": 3}, "steps": 1, "micro": 2, "seed": 44, "units": "none"}
    got = student.run(train_local, [spec], 4)[0]
    for kind, where, units in got["snapshots"]:
        if kind == "forward":  # the test labels parameters by their block, but they share the one buffer
            assert set(units) == {"root", "blocks.0", "blocks.1", "blocks.2"}, f"at {where}: {sorted(units)}"
        elif kind in ("after_backward", "after_step"):
            assert not units, f"{kind}: {units} still gathered"
    for calls in got["traces"]:
        gathers = sum("all_gather" in name for name, _ in calls)
        assert gathers == 1, f"one unit: one all-gather per forward and backward, got {gathers}"
    assert not got["after_eval"]
