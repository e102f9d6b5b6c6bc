"""Lab 08 hidden tests (engine): preemption with parallel sampling and prefix caching together."""

import pytest


@pytest.mark.points(2)
def test_preemption_with_forks_and_prefix_caching(student):
    """n = 2 outputs, a shared prefix and prefix caching, in a cache that forces preemption: still greedy-exact."""
    from autograder.lab08_serving.test_engine import TINY, _check_outputs, _expected, _requests, serve

    requests = _requests([9, 13, 5, 11], [20, 16, 14, 10], seed=41, arrivals=[0, 1, 1, 4])
    for request in requests[1:3]:
        request["prompt"] = requests[0]["prompt"][:8] + request["prompt"]
    requests[1]["params"]["n"] = 2
    config = dict(block_size=2, num_blocks=32, max_num_seqs=4, enable_prefix_caching=True)
    got = student.run(serve, requests, config=config, model=TINY)
    _check_outputs(got, _expected(requests, TINY), "LLMEngine (forks, prefix caching, preemption)")
    assert got["preemptions"] > 0, "expected preemptions in a 64-slot cache"
    assert sum(r["num_copies"] for r in got["trace"]) == 1, "the two outputs of the 21-token prompt: one copy"


@pytest.mark.points(2)
def test_many_short_requests_through_two_running_slots(student):
    """Ten requests through two running slots and blocks of 5: continuous batching refills the slots."""
    from autograder.lab08_serving.test_engine import TINY, _check_outputs, _expected, _requests, serve

    requests = _requests([3, 8, 1, 6, 12, 2, 9, 4, 7, 5], [4, 2, 6, 3, 5, 7, 1, 4, 2, 3], seed=42)
    got = student.run(serve, requests, config=dict(block_size=5, max_num_seqs=2), model=TINY)
    _check_outputs(got, _expected(requests, TINY), "LLMEngine (max_num_seqs=2)")
