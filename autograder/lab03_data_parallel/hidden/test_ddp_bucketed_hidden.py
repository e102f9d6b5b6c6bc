"""Lab 03 hidden tests (bucketed DDP): mixed dtypes never share a bucket."""

import pytest
import torch


@pytest.mark.points(1)
def test_plan_splits_on_dtype():
    """A bucket is one flat buffer, so a change of dtype closes it even below the cap."""
    from lab03_data_parallel.ddp_bucketed import plan_buckets

    params = [torch.empty(10), torch.empty(10, dtype=torch.float64), torch.empty(10, dtype=torch.float64),
              torch.empty(10)]
    got = plan_buckets(params, cap_bytes=10**6)
    assert got == [[3], [2, 1], [0]], f"plan_buckets(float32, float64, float64, float32 under a large cap) gave {got}"
