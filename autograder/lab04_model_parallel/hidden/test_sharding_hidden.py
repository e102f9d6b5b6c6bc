"""Lab 04 hidden tests (sharding): the whole model at tp = 4, where the K/V heads are copied."""

import pytest

from autograder.lab04_model_parallel.workers import check_tp_model, tp_model

CASES = [
    {"model": {"num_layers": 2, "num_heads": 8, "num_kv_heads": 2}, "batch": 2, "seq": 11},
    {"model": {"num_layers": 1}, "batch": 3, "seq": 7, "ignore": 6},
]


@pytest.mark.points(3)
@pytest.mark.time_limit(200)
def test_tp4_with_copied_kv_heads(student):
    """tp = 4 over 2 K/V heads (each copied on 2 ranks), odd sequence lengths, padded targets: the loss and the
    gathered gradients equal the single-process ones."""
    got = student.run(tp_model, 4, 1, 4, CASES, 71)
    check_tp_model(got, CASES, dp=1, tp=4, seed=71, sequence_parallel=False)
