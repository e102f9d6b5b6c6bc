"""Lab 03 hidden tests (fault tolerance): the rank that dies is rank 0, late in the run, at world size 3."""

import pytest


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_rank_zero_dies():
    """Nothing may depend on rank 0 surviving: it dies at the third of four calls, and ranks 1 and 2 carry on."""
    from autograder.lab03_data_parallel.workers import check_fault_run, fault_worker
    from common.launch import run_distributed

    results = run_distributed(fault_worker, world_size=3, may_die={0}, pass_store=True, args=(0, 2, 4, 9),
                              backend="gloo", timeout_s=75)
    check_fault_run(results, victim=0, die_at_call=2, calls=4, seed=9)
