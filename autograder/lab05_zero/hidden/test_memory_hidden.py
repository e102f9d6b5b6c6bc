"""Lab 05 hidden tests (memory): fp32 in flight (4-byte parameters and gradients) on three and sixteen ranks."""

import math

import pytest


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("world_size", [3, 16])
def test_fp32_in_flight(student, world_size):
    """With fp32 in flight the formula's 2-byte terms become 4: measured bytes equal it exactly."""
    from autograder.lab05_zero.test_memory import _paper
    from autograder.lab05_zero.workers import make_model, measure, unit_numels

    got = student.run(measure, [[1, False], [2, False], [3, True]], world_size, "float32")
    numels = unit_numels(make_model(seed=0))
    psi = sum(math.ceil(n / world_size) * world_size for n in numels.values())
    for key, (stage, offload) in (("1", (1, False)), ("2", (2, False)), ("3+offload", (3, True))):
        want = _paper(stage, psi, world_size, p=4, g=4, offload=offload)
        assert got[key]["measured"] == want[:4], f"stage {key}, N={world_size}: {got[key]['measured']} vs {want[:4]}"
