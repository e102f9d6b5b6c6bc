"""Lab 03 hidden tests (FedAvg): the aggregate keeps low-precision dtypes and integer entries."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(1)
def test_aggregate_bf16_and_integer_entries(student):
    """bf16 weights are averaged in float64 and returned in bf16; an integer entry (a step counter) is copied."""
    from autograder.lab03_data_parallel.test_fedavg import aggregate

    states = [{"w": random_tensor(9, 4, dtype=torch.bfloat16, seed=i), "steps": torch.tensor(5)} for i in range(4)]
    weights = [1.0, 2.0, 3.0, 10.0]
    got = student.run(aggregate, states, weights)
    expected = sum(w * s["w"].double() for w, s in zip(weights, states)) / sum(weights)
    assert got["w"].dtype == torch.bfloat16, f"fedavg_aggregate returned {got['w'].dtype} for a bf16 entry"
    check_close(got["w"], expected, name="fedavg_aggregate (bf16 entry)", inputs=describe(num_samples=weights))
    assert torch.equal(got["steps"], torch.tensor(5)), f"fedavg_aggregate changed an integer entry: {got['steps']}"
