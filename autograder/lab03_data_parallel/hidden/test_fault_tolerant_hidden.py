"""Lab 03 hidden tests (fault tolerance): rank 0 dies late; a rank dies in the middle of its all-reduce, or once its
own all-reduce has completed but before the others know; a rank that is only late is kept."""

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


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_a_late_rank_is_kept(student):
    """Rank 1 enters call 1 4.5 s after the others (detect_timeout_s 3 s, grace_s 3 s). The others time out and
    abort the attempt; the late rank must read that decision from the store at once (not time out on its own, 3 s
    later, after the survivors' grace has run out) and rejoin: every call ends with all three ranks and the full sum,
    call 1 after one aborted attempt."""
    from autograder.lab03_data_parallel.test_fault_tolerant import check_log
    from autograder.lab03_data_parallel.workers import fault_input, fault_run
    from common.testing import check_close, describe

    results = student.run(fault_run, 3, 1, 1, 3, 14, how="late", detect_timeout_s=3.0, grace_s=3.0, late_s=4.5)
    for rank, calls in enumerate(results):
        assert calls is not None and len(calls) == 3, f"rank {rank} did not finish 3 calls"
        for call, result in enumerate(calls):
            inputs = describe(world_size=3, late_rank=1, late_call=1, late_s=4.5, detect_timeout_s=3.0, grace_s=3.0,
                              call=call, rank=rank)
            assert result["members"] == [0, 1, 2], (
                f"FaultTolerantAllReduce.members after call {call} is {result['members']}: a late rank was dropped "
                f"({inputs})")
            check_close(result["got"], sum(fault_input(seed=14, call=call, rank=r) for r in range(3)),
                        name="FaultTolerantAllReduce.all_reduce (the sum over every rank)", inputs=inputs)
            check_log(result["log"], call=call, retried=call == 1, inputs=inputs)
