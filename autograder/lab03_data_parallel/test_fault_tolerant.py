"""Lab 03, part 5 (challenge): an all-reduce that survives a rank dying, in the spirit of Hoplite
(fault_tolerant.py). Graded on gloo, with a rank that really dies (os._exit): before a call, while its all-reduce is
under way, or once its own all-reduce has completed (workers.fault_run). The sums are computed here from the inputs
every rank was given (workers.fault_input)."""

import pytest
import torch

from common.testing import check_close, describe


def check_fault_run(results: list, *, victim: int, die_at_call: int, calls: int, seed: int, op: str = "sum",
                    victim_may_count: bool = False) -> None:
    """Survivors finish every call, agree on the members and the result, and each result is the sum (or mean) of the
    inputs of exactly `members`: everyone before die_at_call, the survivors after it. In the call during which the
    victim died after starting, either outcome is right (it may have contributed), as long as all agree."""
    from autograder.lab03_data_parallel.workers import fault_input

    world_size = len(results)
    everyone = list(range(world_size))
    survivors = [r for r in everyone if r != victim]
    assert results[victim] is None, f"rank {victim} was to die but returned {results[victim]!r:.200}"
    for rank in survivors:
        assert results[rank] is not None and len(results[rank]) == calls, f"rank {rank} did not finish {calls} calls"
    for call in range(calls):
        allowed = [everyone] if call < die_at_call else [survivors]
        if call == die_at_call and victim_may_count:
            allowed = [everyone, survivors]
        first = results[survivors[0]][call]
        for rank in survivors:
            result = results[rank][call]
            inputs = describe(world_size=world_size, victim=victim, die_at_call=die_at_call, call=call, rank=rank,
                              op=op)
            assert result["members"] in allowed, (
                f"FaultTolerantAllReduce.members after call {call} is {result['members']}, expected "
                f"{' or '.join(map(str, allowed))} ({inputs})")
            assert result["members"] == first["members"], (
                f"survivors disagree on the members after call {call}: rank {rank} has {result['members']}, rank "
                f"{survivors[0]} {first['members']} ({inputs})")
            expected = sum(fault_input(seed=seed, call=call, rank=r) for r in result["members"])
            if op == "avg":
                expected = expected / len(result["members"])
            check_close(result["got"], expected, name=f"FaultTolerantAllReduce.all_reduce(op={op!r}) (the "
                        f"{'mean' if op == 'avg' else 'sum'} over the members)", inputs=inputs)
            assert torch.equal(result["got"], first["got"]), f"survivors disagree on the result of call {call} ({inputs})"
            check_log(result["log"], call=call, retried=call == die_at_call and result["members"] == survivors,
                      inputs=inputs)


def check_log(log: list, *, call: int, retried: bool, inputs: str) -> None:
    """FaultTolerantAllReduce.log for one call: attempts 0, 1, ... each "start" then "abort" and "view" (a new view),
    the last "start" then "commit"; more than one attempt exactly when the call lost a member."""
    attempts = sorted({attempt for _, attempt, _ in log})
    assert attempts and attempts == list(range(len(attempts))), (
        f"FaultTolerantAllReduce.log of call {call} has attempts {attempts}, expected 0, 1, ... ({inputs}; log {log})")
    for attempt in attempts:
        events = [event for _, a, event in log if a == attempt]
        want = ["start", "commit"] if attempt == attempts[-1] else ["start", "abort", "view"]
        assert events == want, (f"FaultTolerantAllReduce.log of call {call}, attempt {attempt}: {events}, expected "
                                f"{want} ({inputs})")
    assert (len(attempts) > 1) == retried, (
        f"FaultTolerantAllReduce.log of call {call} shows {len(attempts)} attempts, but the members "
        f"{'changed' if retried else 'did not change'} ({inputs}; log {log})")


@pytest.mark.points(4)
@pytest.mark.time_limit(90)
def test_survivors_finish_the_reduction(student):
    """World size 4 on gloo: rank 2 dies (os._exit) before the second of three calls; ranks 0, 1 and 3 detect it,
    agree on who is left, and finish that call and the next among themselves."""
    from autograder.lab03_data_parallel.workers import fault_run

    results = student.run(fault_run, 4, 2, 1, 3, 5)
    check_fault_run(results, victim=2, die_at_call=1, calls=3, seed=5)


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_average_over_the_survivors(student):
    """op='avg' divides by the number of ranks that contributed: 3 before rank 1 dies, 2 after."""
    from autograder.lab03_data_parallel.workers import fault_run

    results = student.run(fault_run, 3, 1, 1, 3, 8, op="avg")
    check_fault_run(results, victim=1, die_at_call=1, calls=3, seed=8, op="avg")
