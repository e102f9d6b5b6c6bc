"""Lab 04 hidden tests (PipeTransformer): two ranks, the pipeline compressed to one stage."""

import pytest

from autograder.lab04_model_parallel.test_pipetransformer import check_elastic
from autograder.lab04_model_parallel.workers import elastic


@pytest.mark.points(2)
@pytest.mark.time_limit(200)
def test_two_ranks_become_two_replicas(student):
    """World 2, 4 blocks: a 2-stage pipeline; freezing 1 block leaves 3 active, which do not fit one stage (capacity
    2): no repack; freezing a second block repacks into 2 one-stage replicas. The trajectory is one process's."""
    plan = {"num_layers": 4, "steps": 5, "freeze": {1: 1, 3: 2}, "lr": 0.3, "alpha": 0.5}
    got = student.run(elastic, 2, plan, 53)
    check_elastic(got, plan, 53, 2)
