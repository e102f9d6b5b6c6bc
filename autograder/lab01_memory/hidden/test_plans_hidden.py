"""Lab 01 hidden tests (plans): the same ideas on inputs the public tests do not show."""

import pytest

from common.testing import check_all_close, describe


@pytest.mark.points(2)
def test_odd_depth_segments_match(student):
    """7 blocks in 3 uneven segments, dropout 0.3: gradients equal the plain model's."""
    from autograder.lab01_memory.test_plans import _plain_gradients, planned_gradients

    case = dict(num_layers=7, dropout=0.3, model_seed=4, batch=dict(batch_size=2, seq_len=11, seed=9), rng_seed=77)
    got = student.run(planned_gradients, dict(plan="segments", num_segments=3), **case)
    want = _plain_gradients(**case)
    check_all_close(got["grads"], want["grads"], name="segments=3 over 7 blocks (gradients)",
                    inputs=describe(tokens=(2, 11), dropout=0.3))
    assert got["counts"] == [2] * 7, f"segments=3 over 7 blocks ran blocks {got['counts']} times, expected 2 each"


@pytest.mark.points(1)
def test_sqrt_plan_at_depth_30(student):
    """round(sqrt(30)) = 5 segments of 6 blocks."""
    from autograder.lab01_memory.test_plans import segments_of

    got = student.run(segments_of, 30, dict(plan="sqrt"))
    assert got == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30)], f"plan_segments(30, sqrt) returned {got}"
