"""Lab 07, part 0: the Triton warm-up, a fused row softmax and a tiled matmul (warmup.py).

Producers (above the tests) run the student's kernels in the grading worker, on the GPU when there is one and through
the Triton interpreter otherwise, and return CPU tensors; the tests compute what is expected here, in float64.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

# -----------------------------------------------------------------------------
# Producers: run in the worker


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def softmax_rows(x: torch.Tensor, *, transpose: bool = False) -> dict:
    """softmax(x) (or softmax of x.t(), a column-major view), and the output's dtype and strides."""
    from lab07_flash_attention.warmup import softmax

    x = x.to(_device())
    if transpose:
        x = x.t()
    y = softmax(x)
    return {"y": y.cpu(), "dtype": str(y.dtype), "stride": list(y.stride()), "x_after": x.cpu()}


def softmax_error(shape: list[int]) -> None:
    from lab07_flash_attention.warmup import softmax

    softmax(torch.ones(*shape, device=_device()))


def matmul_of(a: torch.Tensor, b: torch.Tensor, *, config: dict | None = None, transpose_b: bool = False) -> dict:
    """matmul(a, b) with MatmulConfig(**config) when given; b is transposed in the worker when asked (a view)."""
    from lab07_flash_attention.warmup import MatmulConfig, matmul

    a, b = a.to(_device()), b.to(_device())
    if transpose_b:
        b = b.t()
    c = matmul(a, b, config=MatmulConfig(**config) if config else None)
    return {"c": c.cpu(), "dtype": str(c.dtype)}


def matmul_error(a_shape: list[int], b_shape: list[int], b_dtype: str = "float32") -> None:
    from lab07_flash_attention.warmup import matmul

    matmul(torch.ones(*a_shape, device=_device()), torch.ones(*b_shape, device=_device(),
                                                                dtype=getattr(torch, b_dtype)))


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(1)
def test_softmax_rejects_bad_input(student):
    """A tensor that is not 2-D, and a row too long for one program (N > 65536), raise ValueError."""
    with pytest.raises(ValueError, match="2-D"):
        student.run(softmax_error, [2, 3, 4])
    with pytest.raises(ValueError, match="65536"):
        student.run(softmax_error, [1, 65537])


@pytest.mark.points(1)
def test_matmul_rejects_bad_shapes(student):
    """Shapes that do not chain, tensors that are not 2-D (ValueError), and mismatched dtypes (TypeError)."""
    with pytest.raises(ValueError, match="inner dimensions"):
        student.run(matmul_error, [3, 4], [5, 6])
    with pytest.raises(ValueError, match="2-D"):
        student.run(matmul_error, [3, 4], [4])
    with pytest.raises(ValueError, match="2-D"):
        student.run(matmul_error, [2, 3, 4], [4, 5])
    with pytest.raises(TypeError, match="dtype"):
        student.run(matmul_error, [3, 4], [4, 5], "float64")


@pytest.mark.points(4)
@pytest.mark.parametrize("shape", [(7, 33), (1, 5), (13, 130)])
def test_softmax_matches_float64(student, shape):
    """softmax(x) row by row, for row lengths that are not powers of two (the mask and other=-inf matter)."""
    x = random_tensor(*shape, seed=sum(shape), scale=3.0)
    got = student.run(softmax_rows, x)
    check_close(got["y"], torch.softmax(x.double(), dim=1), name="softmax", inputs=describe(x=x))
    assert got["dtype"] == "torch.float32", f"softmax returned {got['dtype']} for a float32 input"


@pytest.mark.points(1)
def test_softmax_handles_non_contiguous_rows(student):
    """A transposed (column-major) input: the kernel must use both strides; the output is contiguous."""
    x = random_tensor(40, 9, seed=3)
    got = student.run(softmax_rows, x, transpose=True)  # (9, 40), stride (1, 9)
    check_close(got["y"], torch.softmax(x.t().double(), dim=1), name="softmax (transposed input)",
                inputs=describe(x=x.t()) + ", stride=(1, 9)")
    assert got["stride"] == [40, 1], f"softmax of a (9, 40) view returned strides {got['stride']}, not contiguous"


@pytest.mark.points(1)
def test_softmax_rows_of_constants_and_a_single_column(student):
    """Degenerate rows: a constant row gives 1/N everywhere; a single column gives 1; the input is not modified."""
    x = torch.cat([torch.full((2, 70), 100.0), random_tensor(1, 70, seed=4)])  # 100: exp(x) alone overflows
    got = student.run(softmax_rows, x)
    check_close(got["y"], torch.softmax(x.double(), 1), name="softmax (constant rows)", inputs=describe(x=x))
    check_close(got["x_after"], x, name="softmax (its input, after the call)", inputs=describe(x=x))
    column = random_tensor(6, 1, seed=5)
    got = student.run(softmax_rows, column)
    check_close(got["y"], torch.ones(6, 1, dtype=torch.float64), name="softmax (one column)",
                inputs=describe(x=column))


@pytest.mark.points(1)
def test_softmax_longest_allowed_row(student):
    """N = 65536 exactly is allowed (the limit is inclusive) and still a softmax."""
    x = random_tensor(1, 65536, seed=6)
    got = student.run(softmax_rows, x)
    check_close(got["y"], torch.softmax(x.double(), 1), name="softmax (N = 65536)", inputs=describe(x=x))


@pytest.mark.points(4)
@pytest.mark.parametrize("M,K,N", [(33, 47, 29), (16, 16, 16), (70, 20, 45)])
def test_matmul_matches_float64(student, M, K, N):
    """Tiled matmul with ragged M, N and K (masks on all three edges), fp32 accumulation."""
    a = random_tensor(M, K, seed=M)
    b = random_tensor(K, N, seed=N)
    got = student.run(matmul_of, a, b)
    # K products summed in fp32: allow a K-proportional absolute error
    check_close(got["c"], a.double() @ b.double(), name="matmul", inputs=describe(a=a, b=b), atol=1e-6 * K)
    assert got["dtype"] == "torch.float32", f"matmul returned {got['dtype']} for float32 inputs"


@pytest.mark.points(1)
def test_matmul_other_tiles_and_strides(student):
    """Other tile sizes (BLOCK_K smaller than K) and a transposed operand."""
    a = random_tensor(50, 37, seed=5)
    b = random_tensor(21, 37, seed=6)  # transposed in the worker: (37, 21), non-contiguous
    got = student.run(matmul_of, a, b, config=dict(block_m=16, block_n=32, block_k=16), transpose_b=True)
    check_close(got["c"], a.double() @ b.t().double(), name="matmul (16x32x16 tiles)",
                inputs=describe(a=a, b=b.t()), atol=4e-5)


@pytest.mark.points(1)
def test_matmul_tall_and_wide_tiles(student):
    """BLOCK_M != BLOCK_N with a 64-deep K tile: a swapped grid axis or tile size shows on a non-square C."""
    a = random_tensor(19, 100, seed=8)
    b = random_tensor(100, 70, seed=9)
    got = student.run(matmul_of, a, b, config=dict(block_m=32, block_n=16, block_k=64))
    check_close(got["c"], a.double() @ b.double(), name="matmul (32x16x64 tiles)", inputs=describe(a=a, b=b),
                atol=1e-4)
