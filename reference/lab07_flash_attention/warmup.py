"""Triton warm-up: a fused row softmax and a tiled matmul, the two building blocks of FlashAttention.

What they save: `softmax` reads each row once and writes it once (the unfused PyTorch version reads and writes the
(M, N) matrix about five times: max, subtract, exp, sum, divide). `matmul` keeps a (BLOCK_M, BLOCK_N) tile of C in
registers while streaming (BLOCK_M, BLOCK_K) and (BLOCK_K, BLOCK_N) tiles of A and B, so each element of A is read
N / BLOCK_N times instead of N times.

What they teach (Tillet et al. 2019, "Triton", doi:10.1145/3315508.3329973; Triton tutorials 02 and 03):
- a program id picks the tile a program owns (`tl.program_id`),
- offsets and pointer arithmetic address the tile (`base + rows[:, None] * stride_row + cols[None, :] * stride_col`),
- masks guard the ragged edges (`mask=cols < N`, with `other=-inf` for a max and 0 for a sum),
- `tl.dot` multiplies tiles on the tensor cores, accumulating in fp32.

    softmax(x)_ij = exp(x_ij - max_j x_ij) / sum_j exp(x_ij - max_j x_ij)       (one program per row)
    C[m-tile, n-tile] = sum over k-tiles of A[m-tile, k-tile] @ B[k-tile, n-tile]  (one program per C tile)

Usage:
    y = softmax(x)        # x (M, N) float32, any N
    c = matmul(a, b)      # a (M, K), b (K, N)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class MatmulConfig:
    """Tile sizes of `matmul`: powers of two, >= 16 (tl.dot's minimum)."""

    block_m: int = 32
    block_n: int = 32
    block_k: int = 32

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MatmulConfig.{name} ({value}) must be a power of two >= 16")


# -----------------------------------------------------------------------------
# Plain PyTorch versions


def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """Row softmax in five passes over memory (Triton tutorial 02's `naive_softmax`). x (M, N) -> (M, N)."""
    row_max = x.max(dim=1, keepdim=True).values  # subtract the max: exp never overflows
    z = torch.exp(x - row_max)
    return z / z.sum(dim=1, keepdim=True)


# -----------------------------------------------------------------------------
# Public entry points


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Fused row softmax: one program per row, the whole row in registers (BLOCK_N = next power of two >= N).

    Args:
        x: (M, N) float32 (or fp16/bf16 on CUDA), any strides.

    Returns:
        (M, N), x's dtype, contiguous.

    Raises:
        ValueError: if x is not 2-D or its rows are too long to fit one program (N > 65536).
    """
    # BEGIN SOLUTION
    if x.dim() != 2:
        raise ValueError(f"softmax expects a 2-D tensor (M, N), got shape {tuple(x.shape)}")
    M, N = x.shape
    if N > 65536:
        raise ValueError(f"softmax keeps a whole row in registers: N ({N}) must be <= 65536")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    BLOCK_N = triton.next_power_of_2(N)
    _softmax_kernel[(M,)](x, y, N, x.stride(0), x.stride(1), y.stride(0), BLOCK_N=BLOCK_N)
    return y
    # END SOLUTION


def matmul(a: torch.Tensor, b: torch.Tensor, *, config: MatmulConfig | None = None) -> torch.Tensor:
    """Tiled matmul C = A @ B with fp32 accumulation; any M, N, K (edges masked).

    Args:
        a: (M, K); b: (K, N); same dtype (fp32, or fp16/bf16 on CUDA) and device, any strides.
        config: tile sizes (default 32 x 32 x 32).

    Returns:
        c: (M, N) in a's dtype.

    Raises:
        ValueError: on shapes that do not chain (a.shape[1] != b.shape[0]) or tensors that are not 2-D.
        TypeError: on mismatched dtypes.
    """
    # BEGIN SOLUTION
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"matmul expects 2-D tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions must match: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    config = config or MatmulConfig()
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n))
    _matmul_kernel[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
    )
    return c
    # END SOLUTION


# -----------------------------------------------------------------------------
# Kernels


@triton.jit
def _softmax_kernel(
    X, Y,  # pointers
    N,  # row length
    stride_xm, stride_xn, stride_ym,  # strides (elements); Y is contiguous
    BLOCK_N: tl.constexpr,  # power of two >= N: the whole row in one block
):
    """Program m writes row m of Y. Grid axis 0 indexes the row."""
    # BEGIN SOLUTION
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    # -inf outside the row: it loses every max and becomes exp(-inf) = 0 in the sum
    x = tl.load(X + row * stride_xm + cols * stride_xn, mask=cols < N, other=float("-inf")).to(tl.float32)
    z = tl.exp(x - tl.max(x, axis=0))
    y = z / tl.sum(z, axis=0)
    tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=cols < N)
    # END SOLUTION


@triton.jit
def _matmul_kernel(
    A, B, C,  # pointers
    M, N, K,  # sizes
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,  # strides (elements)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # powers of two >= 16
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32: no TF32 rounding
):
    """Program (m, n) writes C[m * BLOCK_M : (m+1) * BLOCK_M, n * BLOCK_N : (n+1) * BLOCK_N].

    Grid axis 0 indexes the row tile of C, axis 1 its column tile.
    """
    # BEGIN SOLUTION
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # fp32 accumulation whatever the input dtype
    for start_k in range(0, K, BLOCK_K):
        ks = start_k + offs_k
        # zeros outside the matrices contribute nothing to the dot products
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
    # END SOLUTION
