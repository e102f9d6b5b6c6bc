"""Lab 03 hidden tests (bucketed DDP): mixed dtypes never share a bucket; a parameter used on one rank only; bucketed
DDP on subgroups."""

import pytest


@pytest.mark.points(1)
def test_plan_splits_on_dtype(student):
    """A bucket is one flat buffer, so a change of dtype closes it even below the cap."""
    from autograder.lab03_data_parallel.test_ddp_bucketed import plans

    got = student.run(plans, {"mixed": ([10, 10, 10, 10], ["float32", "float64", "float64", "float32"], 10**6)})
    assert got["mixed"] == [[3], [2, 1], [0]], (
        f"plan_buckets(float32, float64, float64, float32 under a large cap) gave {got['mixed']}")


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_parameter_used_on_one_rank_only(shared_run, compare_tensors):
    """A parameter whose gradient exists on rank 0 only: no deadlock (rank 0 fills that bucket during backward, the
    others in finish(), and all launch in bucket order), and its gradient is rank 0's divided by p."""
    from autograder.lab03_data_parallel.test_ddp_naive import check_training
    from autograder.lab03_data_parallel.workers import ddp_training

    results = shared_run(ddp_training, 2, ["bucketed:0.01"], 2, 23, partly_unused=True)
    check_training(results, variant="bucketed:0.01", label="BucketedDDP with unused_head used on rank 0 only",
                   world_size=2, steps=2, seed=23, partly_unused=True, compare=compare_tensors)


@pytest.mark.points(1)
@pytest.mark.time_limit(120)
def test_bucketed_ddp_on_subgroups(shared_run, compare_tensors):
    """Two data-parallel groups of 2 in a world of 4: broadcast from each group's rank 0, average over the group."""
    from autograder.lab03_data_parallel.test_ddp_naive import check_training, subgroup_training

    check_training(subgroup_training(shared_run), variant="bucketed:0.04", label="BucketedDDP(group=subgroup)",
                   world_size=4, steps=2, seed=31, subgroups=True, compare=compare_tensors)
