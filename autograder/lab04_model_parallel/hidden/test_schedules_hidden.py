"""Lab 04 hidden tests (schedules): larger pipelines."""

import math

import pytest

from autograder.lab04_model_parallel.test_schedules import expected_1f1b, schedule_actions, simulated


@pytest.mark.points(2)
def test_large_pipelines(student):
    """p up to 16 and m up to 40: the 1F1B actions, the bubble and the peak in flight."""
    sizes = [(16, 3), (16, 40), (7, 13), (12, 12), (6, 1)]
    plans = student.run(schedule_actions, [("1f1b", p, m, 1) for p, m in sizes])
    for (p, m), plan in zip(sizes, plans):
        assert plan == expected_1f1b(p, m), f"one_f_one_b({p}, {m}) differs from the rule"
    cases = [(name, p, m, 1, 1.0, 3.0) for name in ("gpipe", "1f1b") for p, m in sizes]
    for (name, p, m, *_), got in zip(cases, student.run(simulated, cases)):
        assert math.isclose(got["bubble"], (p - 1) / (m + p - 1), abs_tol=1e-12), (name, p, m, got["bubble"])
        assert max(got["peak"]) == (m if name == "gpipe" else min(p, m)), (name, p, m, got["peak"])
