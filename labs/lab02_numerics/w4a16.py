"""W4A16: a Triton matmul that reads 4-bit weights and dequantizes them in registers (int4 group-wise or NF4).

What it saves: bytes moved. Decoding one token multiplies a (1, K) activation by every (N, K) weight, so its time is
the time to read the weights: 2 N K bytes in bf16, N K / 2 (+ scales) in 4 bits, about 4x less. Dequantizing first
(`w4a16_reference`) writes and re-reads a bf16 copy of W and loses the saving; fusing the dequantization into the
matmul keeps it (the idea behind GPTQ's and Marlin's kernels, Frantar et al. 2022/2024, arXiv:2210.17323,
arXiv:2408.11743).

The computation, for x (M, K) and a weight stored as codes q (N, K) in 4 bits with one scale s per group of P along K:

    W'[n, k] = s[n, k // P] * v(q[n, k])        v(q) = q - 8 (int4)  or  codebook[q] (NF4, nf4.py)
    y = x W'^T                                   (M, N), accumulated in fp32

Packing (quantize.pack_int4) puts column 2j in the low nibble and column 2j + 1 in the high nibble of byte j. Rather
than interleave the two halves back into K order, the kernel splits x the same way:

    y = x[:, 0::2] W'[:, 0::2]^T + x[:, 1::2] W'[:, 1::2]^T                                  (two tl.dot per tile)

Usage:
    qw = int4_quantize(w, group_size=128)        # or quantize_nf4(w, config=NF4Config(block_size=64))
    y = w4a16_matmul(x, qw)                     # x (M, K) bf16 on CUDA, or fp32 under TRITON_INTERPRET=1 on CPU
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .nf4 import NF4Weight, dequantize_nf4, nf4_codebook
from .quantize import Int4Weight, int4_dequantize

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class W4A16Config:
    """Tile sizes (all powers of two). block_m >= 16 and block_n >= 16 (tl.dot's minimum); block_k a multiple of the
    group size with block_k / 2 >= 16; split_k programs share one output tile's K range (partial sums in fp32)."""

    block_m: int = 16
    block_n: int = 32
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "split_k", "num_warps"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"W4A16Config.{name} must be a positive power of two, got {value}")
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 32:
            raise ValueError(f"W4A16Config: block_m ({self.block_m}) and block_n ({self.block_n}) must be >= 16 and "
                             f"block_k ({self.block_k}) >= 32 for tl.dot")
        if self.num_stages < 1:
            raise ValueError(f"W4A16Config.num_stages must be >= 1, got {self.num_stages}")


# -----------------------------------------------------------------------------
# Plain-PyTorch version


def w4a16_reference(x: torch.Tensor, weight: Int4Weight | NF4Weight) -> torch.Tensor:
    """Dequantize-then-matmul, in fp32: x (M, K) @ W'^T -> (M, N) fp32. The kernel is checked against this."""
    w = int4_dequantize(weight) if isinstance(weight, Int4Weight) else dequantize_nf4(weight)
    return x.float() @ w.t()


# -----------------------------------------------------------------------------
# Public entry point


def default_config(M: int, N: int, K: int, group_size: int) -> W4A16Config:
    """Fixed tiles for decode-like shapes (M <= 16): one M tile, 32-wide N tiles, K steps of up to 128 columns, K split
    in up to 4.

    Chosen from the tile sweep recorded in results/h100/lab02_benchmark.json (H100, M = 1, 27 tiles): this tile was the
    fastest at K = N = 4096 (22.5 us) and within 4% of the fastest at 8192. Split-K by 4 gives N / 32 * 4 = 512
    programs at N = 4096, about 4 per SM, which the memory system needs to keep enough loads in flight.
    Under the interpreter (CPU) the smallest legal tiles are fastest, so tests stay quick.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return W4A16Config(block_m=16, block_n=16, block_k=max(32, group_size), split_k=1, num_stages=1)
    # the widest K step (a multiple of the group, at most 128) that tiles K: 128 for the benchmark's K = 4096/8192,
    # smaller for awkward K such as 192
    block_k = max(group_size, 32)
    while block_k < 128 and K % (2 * block_k) == 0:
        block_k *= 2
    split_k = 4
    while split_k > 1 and (K // block_k) % split_k:
        split_k //= 2  # every split must cover whole K steps
    return W4A16Config(block_m=16, block_n=32, block_k=block_k, split_k=split_k, num_warps=4, num_stages=4)


@functools.lru_cache(maxsize=None)
def cached_codebook(device: torch.device) -> torch.Tensor:
    """nf4_codebook() on `device`, built once (fp32, 16 values)."""
    return nf4_codebook(device=device)


def w4a16_matmul(x: torch.Tensor, weight: Int4Weight | NF4Weight, *, config: W4A16Config | None = None
                 ) -> torch.Tensor:
    """y = x W'^T with W' dequantized inside the kernel.

    Args:
        x: (M, K) activations, fp32/fp16/bf16, on the weight's device.
        weight: an Int4Weight (quantize.int4_quantize) or NF4Weight (nf4.quantize_nf4) of shape (N, K). NF4's
            double-quantized scales are dequantized first (N K / P values, a 1/P-size side job).
        config: tile sizes; default_config(M, N, K, P) when None.

    Returns:
        (M, N) in x.dtype (accumulated in fp32).

    Raises:
        TypeError: unsupported activation dtype or weight type.
        ValueError: x not 2-D, K mismatch, devices differ, or a group size / block_k that does not tile K.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: w4a16_matmul is not implemented yet (lab02_numerics/w4a16.py)")


# -----------------------------------------------------------------------------
# The kernel


@triton.jit
def w4a16_kernel(
    # pointers
    x_ptr, packed_ptr, scales_ptr, codebook_ptr, out_ptr,
    # sizes
    M, N, K,
    # strides (in elements)
    stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    # meta-parameters
    GROUP_SIZE: tl.constexpr,  # P, a power of two dividing BLOCK_K
    BLOCK_M: tl.constexpr,  # >= 16 (tl.dot); decode's M <= 16 fits one tile
    BLOCK_N: tl.constexpr,  # >= 16
    BLOCK_K: tl.constexpr,  # K columns per step; BLOCK_K / 2 packed bytes per weight row, >= 16 for tl.dot
    SPLIT_K: tl.constexpr,  # programs sharing one output tile
    IS_NF4: tl.constexpr,  # codebook lookup instead of q - 8
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot (fp32 in the interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for exact fp32, "tf32" (ignored) for 16-bit operands
):
    """Program (m, n, s) writes out[s, m*BLOCK_M:(m+1)*BLOCK_M, n*BLOCK_N:(n+1)*BLOCK_N]: the partial product over
    the s-th of SPLIT_K equal slices of K. Grid axis 0 indexes M tiles, axis 1 N tiles, axis 2 K slices.
    The launcher guarantees K % (BLOCK_K * SPLIT_K) == 0, so only the M and N edges are masked."""
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: w4a16_kernel is not implemented yet (lab02_numerics/w4a16.py)")
