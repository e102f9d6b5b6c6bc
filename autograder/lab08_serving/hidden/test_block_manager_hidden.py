"""Lab 08 hidden tests (block manager): fork chains, other sizes, more random sequences."""

import pytest


@pytest.mark.points(2)
def test_fork_of_a_fork_copies_once_per_writer(student):
    """Three sequences share a partly filled block: the first two writers copy it, the last writes in place."""
    from autograder.lab08_serving.test_block_manager import _check_against_model, run_operations

    ops = [["allocate", 0, [1, 2, 3, 4, 5, 6, 7]], ["fork", 0, 1], ["fork", 1, 2], ["append", 2, 8],
           ["append", 0, 9], ["append", 1, 10], ["append", 1, 11], ["free", 2], ["fork", 1, 3], ["append", 3, 12],
           ["free", 0], ["free", 1], ["free", 3]]
    log = student.run(run_operations, ops, num_blocks=9, block_size=5)
    copies = [e["result"] is not None for op, e in zip(ops, log) if op[0] == "append"]
    assert copies == [True, True, False, False, True], f"copies per append: {copies}"
    _check_against_model(ops, log, num_blocks=9, block_size=5)


@pytest.mark.points(2)
@pytest.mark.parametrize("seed, num_blocks, block_size", [(17, 5, 6), (18, 30, 2)])
def test_more_random_operations(student, seed, num_blocks, block_size):
    from autograder.lab08_serving.test_block_manager import _check_against_model, _random_operations, run_operations

    ops = _random_operations(seed, 250)
    log = student.run(run_operations, ops, num_blocks=num_blocks, block_size=block_size)
    _check_against_model(ops, log, num_blocks=num_blocks, block_size=block_size)
