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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: softmax is not implemented yet (lab07_flash_attention/warmup.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: matmul is not implemented yet (lab07_flash_attention/warmup.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _softmax_kernel is not implemented yet (lab07_flash_attention/warmup.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _matmul_kernel is not implemented yet (lab07_flash_attention/warmup.py)")
