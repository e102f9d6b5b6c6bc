"""Lab 07 hidden tests (warm-up): softmax stability and a thin matmul."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(1)
def test_softmax_large_values(student):
    """Values around +-1000: without subtracting the row max, exp overflows."""
    from autograder.lab07_flash_attention.test_warmup import softmax_rows

    x = random_tensor(5, 70, seed=9, scale=1000.0)
    got = student.run(softmax_rows, x)
    check_close(got["y"], torch.softmax(x.double(), 1), name="softmax (large values)", inputs=describe(x=x))


@pytest.mark.points(1)
def test_matmul_single_row(student):
    from autograder.lab07_flash_attention.test_warmup import matmul_of

    a = random_tensor(1, 100, seed=1)
    b = random_tensor(100, 3, seed=2)
    got = student.run(matmul_of, a, b)
    check_close(got["c"], a.double() @ b.double(), name="matmul (1 x 100 @ 100 x 3)", inputs=describe(a=a, b=b),
                atol=1e-4)
