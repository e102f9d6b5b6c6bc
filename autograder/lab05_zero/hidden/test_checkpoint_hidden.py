"""Lab 05 hidden tests (checkpoints): an offloaded ZeRO-3 saves, a ZeRO-2 on one rank loads."""

import pytest

from common.testing import check_all_close


@pytest.mark.points(1)
@pytest.mark.time_limit(240)
def test_offloaded_state_round_trip(student):
    """Offloaded masters (on the host) are saved and loaded like any others."""
    from autograder.lab05_zero.workers import expected_training, reshard

    phases = [{"world_size": 1, "stage": 3, "first": 0, "steps": 2, "seed": 47, "offload": True},
              {"world_size": 1, "stage": 2, "first": 2, "steps": 1, "seed": 47, "offload": True}]
    results = student.run(reshard, phases, timeout_s=200)
    want = expected_training(steps=3, world_size=4, micro=1, seed=47)
    got = results[1][0]
    check_all_close(got["masters"], {k: want["params"][k] for k in got["masters"]},
                    name="masters after an offloaded save and load")
