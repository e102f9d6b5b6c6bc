"""Lab 05 hidden tests (ZeRO-2): three ranks, three micro-batches, the whole model as one unit."""

import pytest

from common.testing import describe


@pytest.mark.points(2)
@pytest.mark.time_limit(240)
def test_zero2_one_unit_three_ranks(student):
    """units=[] (one root unit, one reduce-scatter per backward), three ranks, three micro-batches a step."""
    from autograder.lab05_zero.workers import check_training, expected_training, train

    spec = {"config": {"stage": 2}, "steps": 2, "micro": 3, "seed": 42, "units": "none"}
    results = student.run(train, [spec], 3, timeout_s=200)[0]
    want = expected_training(steps=2, world_size=3, micro=3, seed=42)
    check_training(results, want, name="ZeRO2", inputs=describe(stage=2, world_size=3, micro_batches=3, units=[]))
    for rank, got in enumerate(results):
        counts = [sum("reduce_scatter" in name for name, _ in calls) for calls in got["traces"]]
        assert counts == [1] * 6, f"one unit: one reduce-scatter per backward, got {counts} (rank {rank})"
