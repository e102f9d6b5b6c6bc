"""Lab 03, part 5 (challenge): an all-reduce that survives a rank dying, in the spirit of Hoplite
(fault_tolerant.py). Graded on gloo, with a rank killed by os._exit."""

import pytest


@pytest.mark.points(4)
@pytest.mark.time_limit(90)
def test_survivors_finish_the_reduction():
    """World size 4 on gloo: rank 2 dies (os._exit) at the second of three calls; ranks 0, 1 and 3 detect it, agree on
    who is left, and finish that call and the next among themselves."""
    from autograder.lab03_data_parallel.workers import check_fault_run, fault_worker
    from common.launch import run_distributed

    results = run_distributed(fault_worker, world_size=4, may_die={2}, pass_store=True, args=(2, 1, 3, 5),
                              backend="gloo", timeout_s=75)
    check_fault_run(results, victim=2, die_at_call=1, calls=3, seed=5)
