"""Lab 04 hidden tests (pipelines): three stages of uneven size."""

import pytest

from autograder.lab04_model_parallel.test_pipeline import _check_pipeline, _single_process
from autograder.lab04_model_parallel.test_schedules import expected_1f1b, expected_gpipe
from autograder.lab04_model_parallel.workers import pipeline
from common.testing import describe


@pytest.mark.points(3)
@pytest.mark.time_limit(200)
def test_three_uneven_stages(student):
    """p = 3 over 5 blocks (2, 2, 1), a batch of 6: GPipe with m = 6 and 1F1B with m = 2 < p and m = 3 give the
    single-process loss and gradients, each rank following its schedule."""
    runs = [{"schedule": "gpipe", "num_microbatches": 6}, {"schedule": "1f1b", "num_microbatches": 2},
            {"schedule": "1f1b", "num_microbatches": 3}]
    got = student.run(pipeline, 3, runs, 81, 5, 6)
    for index, run in enumerate(runs):
        m = run["num_microbatches"]
        want_loss, want_grads = _single_process(5, 81 + index, batch_size=6)
        what = f"PipelineRuntime ({run['schedule']}, p=3, m={m})"
        _check_pipeline(got[-1][index]["loss"], [out[index]["grads"] for out in got], want_loss, want_grads,
                        what=what, where=describe(tokens=(6, 9), num_layers=5))
        plan = (expected_gpipe if run["schedule"] == "gpipe" else expected_1f1b)(3, m)
        for r, out in enumerate(got):
            order = [(kind, i) for kind, i, _, _ in out[index]["timeline"]]
            assert order == [(kind, i) for kind, i, _ in plan[r]], f"{what}: rank {r} ran {order}"
