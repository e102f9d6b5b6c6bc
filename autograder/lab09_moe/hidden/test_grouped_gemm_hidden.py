"""Lab 09 hidden tests (grouped GEMM): the same ideas on inputs the public tests do not show."""

import pytest


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("counts,K,N", [([53], 24, 80), ([16, 16, 1, 0, 31], 48, 8), ([7, 2], 33, 16)])
def test_one_expert_and_tile_multiples(student, counts, K, N):
    """E = 1 (a plain GEMM over a ragged number of rows, its last m-tile in a partial group); slices that are exact
    tile multiples next to 1 and 31 rows, N = 8 narrower than a tile; K = 33, one column past a K step."""
    from autograder.lab09_moe.test_grouped_gemm import _check_gemm, _device, gemm_of

    got = student.run(gemm_of, counts, K, N, 21, "triton", _device())
    _check_gemm(got, counts, K, N, 21, "grouped_gemm")


@pytest.mark.points(1)
@pytest.mark.time_limit(120)
def test_strided_x_alone(student):
    """Only x strided (a transposed view), weights contiguous, an empty first expert."""
    from autograder.lab09_moe.test_grouped_gemm import _check_gemm, _device, gemm_of

    counts, K, N = [0, 9, 18], 32, 32
    got = student.run(gemm_of, counts, K, N, 4, "triton", _device(), strided_x=True)
    _check_gemm(got, counts, K, N, 4, "grouped_gemm (strided x)", strided_x=True)
