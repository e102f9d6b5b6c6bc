"""Lab 02 hidden tests (W4A16): several M tiles, NF4 without double quantization, split-K over several groups."""

import pytest

from common.testing import random_tensor


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_many_m_tiles_nf4_single_quant(student):
    """33 rows (3 M tiles), NF4 in blocks of 32 with plain scales, the default tiles."""
    from autograder.lab02_numerics.test_w4a16 import check_output, make_weight, w4a16

    x = random_tensor(33, 128, seed=70)
    weight = make_weight("nf4", 17, 128, 32, seed=71, scale=1.0)
    check_output(student.run(w4a16, x, weight), x, weight, name="w4a16_matmul (nf4, 3 M tiles)")


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("kind", ["int4", "nf4"])
def test_split_k_with_several_groups_per_step(student, kind):
    """Split-K by 2 with 4 groups per K step, 2 M tiles and ragged N, int4 and NF4."""
    from autograder.lab02_numerics.test_w4a16 import check_output, make_weight, w4a16

    x = random_tensor(17, 512, seed=72)
    weight = make_weight(kind, 50, 512, 32, seed=73)
    config = dict(block_m=16, block_n=32, block_k=128, split_k=2, num_stages=1)
    check_output(student.run(w4a16, x, weight, config), x, weight,
                 name=f"w4a16_matmul ({kind}, split_k=2, 4 groups per K step)")
