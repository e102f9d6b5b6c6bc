"""Lab 08 hidden tests (metrics)."""

import pytest


@pytest.mark.points(1)
def test_percentile_at_awkward_ranks(student):
    from autograder.lab08_serving.test_metrics import _quantile, percentile_of

    values = [9.0, 2.0, 7.0, 7.0, 1.0, 4.0, 3.0]
    for q in (33.3, 66.7, 95.0):
        got = student.run(percentile_of, values, q)
        assert got == pytest.approx(_quantile(values, q), rel=1e-12), f"percentile({values}, {q}) = {got}"
