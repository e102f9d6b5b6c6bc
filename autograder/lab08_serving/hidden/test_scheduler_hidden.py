"""Lab 08 hidden tests (scheduler): one-slot blocks, late arrivals into a full cache."""

import pytest


@pytest.mark.points(3)
@pytest.mark.parametrize("num_blocks, block_size", [(24, 1), (7, 5)])
def test_late_arrivals_into_a_full_cache(student, num_blocks, block_size):
    from autograder.lab08_serving.test_scheduler import _replay, simulate

    requests = [(6, 15, 0), (2, 18, 0), (4, 9, 2), (8, 6, 4), (3, 12, 6), (5, 7, 6), (1, 10, 11)]
    setup = dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=5, max_num_batched_tokens=26)
    result = student.run(simulate, requests, **setup)
    assert _replay(requests, result, **setup) > 0, "no preemption, though the cache is too small"
