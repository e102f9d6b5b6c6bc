"""Lab 07, part 0: the Triton warm-up, a fused row softmax and a tiled matmul (warmup.py)."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(4)
@pytest.mark.parametrize("shape", [(7, 33), (1, 5), (13, 130)])
def test_softmax_matches_float64(shape, device):
    """softmax(x) row by row, for row lengths that are not powers of two (the mask and other=-inf matter)."""
    from lab07_flash_attention.warmup import softmax

    x = random_tensor(*shape, seed=sum(shape), scale=3.0).to(device)
    expected = torch.softmax(x.double().cpu(), dim=1)
    check_close(softmax(x), expected, name="softmax", inputs=describe(x=x))


@pytest.mark.points(1)
def test_softmax_handles_non_contiguous_rows(device):
    """A transposed (column-major) input: the kernel must use both strides."""
    from lab07_flash_attention.warmup import softmax

    x = random_tensor(40, 9, seed=3).to(device).t()  # (9, 40), stride (1, 9)
    check_close(softmax(x), torch.softmax(x.double().cpu(), dim=1), name="softmax (transposed input)",
                inputs=describe(x=x) + f", stride={x.stride()}")


@pytest.mark.points(4)
@pytest.mark.parametrize("M,K,N", [(33, 47, 29), (16, 16, 16), (70, 20, 45)])
def test_matmul_matches_float64(M, K, N, device):
    """Tiled matmul with ragged M, N and K (masks on all three edges), fp32 accumulation."""
    from lab07_flash_attention.warmup import matmul

    a = random_tensor(M, K, seed=M).to(device)
    b = random_tensor(K, N, seed=N).to(device)
    expected = a.double().cpu() @ b.double().cpu()
    # K products summed in fp32: allow a K-proportional absolute error
    check_close(matmul(a, b), expected, name="matmul", inputs=describe(a=a, b=b), atol=1e-6 * K)


@pytest.mark.points(1)
def test_matmul_other_tiles_and_strides(device):
    """Other tile sizes (BLOCK_K smaller than K) and a transposed operand."""
    from lab07_flash_attention.warmup import MatmulConfig, matmul

    a = random_tensor(50, 37, seed=5).to(device)
    b = random_tensor(21, 37, seed=6).to(device).t()  # (37, 21), non-contiguous
    config = MatmulConfig(block_m=16, block_n=32, block_k=16)
    check_close(matmul(a, b, config=config), a.double().cpu() @ b.double().cpu(), name="matmul (16x32x16 tiles)",
                inputs=describe(a=a, b=b), atol=4e-5)


@pytest.mark.points(1)
def test_matmul_rejects_bad_shapes():
    from lab07_flash_attention.warmup import matmul

    with pytest.raises(ValueError, match="inner dimensions"):
        matmul(torch.ones(3, 4), torch.ones(5, 6))
