"""Lab 03 hidden tests (collectives): ring all-reduce inside subgroups, where peers must be addressed by global rank."""

import pytest

from common.testing import check_close, describe


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_ring_all_reduce_in_two_subgroups(distributed):
    """World size 4: the even and the odd ranks each run a ring all-reduce in their own subgroup, concurrently."""
    from autograder.lab03_data_parallel.workers import ring_subgroup_worker

    results = distributed(ring_subgroup_worker, world_size=4, args=(21,), timeout_s=90)
    for rank, (got, expected) in enumerate(results):
        check_close(got, expected, name="ring_all_reduce(group=subgroup) against dist.all_reduce(group=subgroup)",
                    inputs=describe(world_size=4, rank=rank, subgroup="even ranks" if rank % 2 == 0 else "odd ranks"))
