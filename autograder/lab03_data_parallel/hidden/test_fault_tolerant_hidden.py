"""Lab 03 hidden tests (fault tolerance): rank 0 dies late; a rank dies in the middle of its all-reduce, or once its
own all-reduce has completed but before the others know."""

import pytest


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_rank_zero_dies(student):
    """Nothing may depend on rank 0 surviving: it dies before the third of four calls, and ranks 1 and 2 carry on."""
    from autograder.lab03_data_parallel.test_fault_tolerant import check_fault_run
    from autograder.lab03_data_parallel.workers import fault_run

    results = student.run(fault_run, 3, 0, 2, 4, 9)
    check_fault_run(results, victim=0, die_at_call=2, calls=4, seed=9)


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_rank_dies_mid_collective(student):
    """Rank 1 dies 10 ms after starting its gloo all-reduce of call 1: the survivors still finish every call."""
    from autograder.lab03_data_parallel.test_fault_tolerant import check_fault_run
    from autograder.lab03_data_parallel.workers import fault_run

    results = student.run(fault_run, 3, 1, 1, 3, 12, how="launched", detect_timeout_s=6.0)
    check_fault_run(results, victim=1, die_at_call=1, calls=3, seed=12, victim_may_count=True)


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_rank_dies_after_its_own_part_completed(student):
    """Rank 2 dies the moment its all-reduce of call 1 has completed (it holds the sum but never reports it): the
    survivors must not wait for it forever, and must agree on whether its contribution counts."""
    from autograder.lab03_data_parallel.test_fault_tolerant import check_fault_run
    from autograder.lab03_data_parallel.workers import fault_run

    results = student.run(fault_run, 3, 2, 1, 3, 13, how="completed", detect_timeout_s=6.0)
    check_fault_run(results, victim=2, die_at_call=1, calls=3, seed=13, victim_may_count=True)
