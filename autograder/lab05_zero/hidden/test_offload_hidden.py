"""Lab 05 hidden tests (offload): ZeRO-1 with offload copies at step time; one real rank gives exact results."""

import pytest

from common.testing import describe


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_zero1_offload_copies_at_step(student):
    """ZeRO-1 has no gradient hooks: its offloaded optimizer receives every unit's gradient in step(), once per
    step, and keeps its state on the CPU; one real rank, results equal single-process training."""
    from autograder.lab05_zero.workers import check_training, expected_training, train_local

    spec = {"config": {"stage": 1, "offload": True}, "steps": 2, "micro": 2, "seed": 45, "offload_trace": True}
    got = student.run(train_local, [spec], 1)[0]
    assert len(got["receive_calls"]) == 2 * 4, f"receive called {len(got['receive_calls'])} times in two steps"
    assert got["state_devices"] == ["cpu"]
    want = expected_training(steps=2, world_size=1, micro=2, seed=45)
    check_training([got], want, name="ZeRO1 with offload", inputs=describe(stage=1, world_size=1))
