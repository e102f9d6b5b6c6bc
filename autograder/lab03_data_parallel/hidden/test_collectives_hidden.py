"""Lab 03 hidden tests (collectives): the ring collectives inside subgroups, where peers must be addressed by global
rank and chunks by group rank."""

import pytest


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_ring_collectives_in_two_subgroups(shared_run):
    """World size 4: the even and the odd ranks each run every ring collective in their own subgroup, concurrently,
    with the values and the point-to-point volume of a ring of 2."""
    from autograder.lab03_data_parallel.test_collectives import check_traffic, check_values, ring_results

    results = ring_results(shared_run, 4, subgroups=True)
    check_values(results, world_size=4, subgroups=True)
    check_traffic(results, world_size=4)
