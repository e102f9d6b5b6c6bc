"""Lab 07 hidden tests (warm-up): softmax stability and a thin matmul."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(1)
def test_softmax_large_values(device):
    """Values around +-1000: without subtracting the row max, exp overflows."""
    from lab07_flash_attention.warmup import softmax

    x = random_tensor(5, 70, seed=9, scale=1000.0).to(device)
    check_close(softmax(x), torch.softmax(x.double().cpu(), 1), name="softmax (large values)", inputs=describe(x=x))


@pytest.mark.points(1)
def test_matmul_single_row(device):
    from lab07_flash_attention.warmup import matmul

    a = random_tensor(1, 100, seed=1).to(device)
    b = random_tensor(100, 3, seed=2).to(device)
    check_close(matmul(a, b), a.double().cpu() @ b.double().cpu(), name="matmul (1 x 100 @ 100 x 3)",
                inputs=describe(a=a, b=b), atol=1e-4)
