"""Lab 05 hidden tests (ZeRO-1): three ranks, AdamW's default betas, no weight decay, four steps."""

import pytest

from common.testing import describe


@pytest.mark.points(2)
@pytest.mark.time_limit(240)
def test_zero1_on_three_ranks(student):
    """An odd world size, where no unit divides evenly: still single-process training."""
    from autograder.lab05_zero.workers import check_training, expected_training, train

    adamw = {"betas": (0.9, 0.999), "weight_decay": 0.0, "lr": 3e-3}
    spec = {"config": {"stage": 1}, "adamw": adamw, "steps": 4, "micro": 1, "seed": 41}
    results = student.run(train, [spec], 3, timeout_s=200)[0]
    want = expected_training(steps=4, world_size=3, micro=1, seed=41, adamw={**adamw, "eps": 1e-6})
    check_training(results, want, name="ZeRO1", inputs=describe(stage=1, world_size=3, steps=4))
