"""Lab 10 hidden tests (intra-op ILP): larger random graphs with several cycles, against brute force."""

import pytest

from autograder.lab10_auto_parallel.test_intra_op import _brute_force, _objective, _random_problem
from autograder.lab10_auto_parallel.workers import call


@pytest.mark.points(2)
def test_larger_graphs(student):
    """8 and 9 nodes, a cycle and two chords each."""
    problems = [_random_problem(seed, n, extra) for seed, n, extra in ((21, 8, [(7, 0), (2, 6)]),
                                                                      (22, 9, [(0, 4), (8, 3)]))]
    got = student.run(call, [{"module": "intra_op", "fn": "solve_intra_op", "args": [("a", c), ("b", e)]}
                             for c, e in problems])
    for (costs, edges), (choice, _) in zip(problems, got):
        assert abs(_objective(costs, edges, choice) - _brute_force(costs, edges)) < 1e-9, (
            f"choice {choice} is not optimal")
