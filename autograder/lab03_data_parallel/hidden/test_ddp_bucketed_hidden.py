"""Lab 03 hidden tests (bucketed DDP): mixed dtypes never share a bucket; a parameter used on one rank only."""

import pytest
import torch

from common.testing import describe


@pytest.mark.points(1)
def test_plan_splits_on_dtype():
    """A bucket is one flat buffer, so a change of dtype closes it even below the cap."""
    from lab03_data_parallel.ddp_bucketed import plan_buckets

    params = [torch.empty(10), torch.empty(10, dtype=torch.float64), torch.empty(10, dtype=torch.float64),
              torch.empty(10)]
    got = plan_buckets(params, cap_bytes=10**6)
    assert got == [[3], [2, 1], [0]], f"plan_buckets(float32, float64, float64, float32 under a large cap) gave {got}"


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_parameter_used_on_one_rank_only(distributed, compare_tensors):
    """A parameter whose gradient exists on rank 0 only: no deadlock, and its gradient is rank 0's divided by p."""
    from autograder.lab03_data_parallel.workers import partly_unused_worker

    results = distributed(partly_unused_worker, world_size=2, args=(2, 23), timeout_s=60)
    for rank, out in enumerate(results):
        for step in range(2):
            compare_tensors(out[f"grads {step}"], out[f"reference grads {step}"],
                            name=f"BucketedDDP with unused_head used on rank 0 only: gradient of step {step + 1}",
                            inputs=describe(world_size=2, rank=rank, bucket_cap_mb=0.01))
