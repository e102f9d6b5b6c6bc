"""Lab 10 hidden tests (run_plan): world 2, ZeRO 3 with accumulation, a pipeline with checkpointing."""

import pytest

from autograder.lab10_auto_parallel.test_execute import _check
from autograder.lab10_auto_parallel.workers import train_plans


@pytest.mark.points(2)
@pytest.mark.time_limit(200)
def test_world_two(student):
    """dp 2 ZeRO 3 (m 2), pp 2 (m 4, checkpointing), tp 2 ZeRO 0 (m 4): one process's losses."""
    plans = [{"dp": 2, "zero_stage": 3, "num_microbatches": 2},
             {"pp": 2, "num_microbatches": 4, "checkpointing": True}, {"tp": 2, "num_microbatches": 4}]
    got = student.run(train_plans, plans, world_size=2, num_layers=4, batch_size=8, seq_len=16, steps=3, seed=3)
    _check(plans, got)
