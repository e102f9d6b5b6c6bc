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
    # BEGIN SOLUTION
    if not isinstance(weight, (Int4Weight, NF4Weight)):
        raise TypeError(f"w4a16_matmul: weight must be an Int4Weight or NF4Weight, got {type(weight).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"w4a16_matmul: unsupported activation dtype {x.dtype}; expected one of {ACTIVATION_DTYPES}")
    if x.dim() != 2:
        raise ValueError(f"w4a16_matmul: x must be (M, K), got shape {tuple(x.shape)}")
    (M, K), (N, K_w) = x.shape, weight.shape
    if K != K_w:
        raise ValueError(f"w4a16_matmul: x has K = {K} but the weight has K = {K_w}")
    if x.device != weight.packed.device:
        raise ValueError(f"w4a16_matmul: x is on {x.device} but the weight is on {weight.packed.device}")
    is_nf4 = isinstance(weight, NF4Weight)
    group_size = weight.block_size if is_nf4 else weight.group_size
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"w4a16_matmul: group_size ({group_size}) must be a power of two >= 32 for the kernel")
    config = config or default_config(M, N, K, group_size)
    if config.block_k % group_size:
        raise ValueError(f"w4a16_matmul: block_k ({config.block_k}) must be a multiple of group_size ({group_size})")
    if K % (config.block_k * config.split_k):
        raise ValueError(f"w4a16_matmul: block_k * split_k ({config.block_k} * {config.split_k}) must divide K ({K})")
    scales = weight.block_scales() if is_nf4 else weight.scales  # (N, K / P) fp32
    # building the codebook takes ~10 tiny kernels: cache it per device (int4 never reads it; pass any pointer)
    codebook = cached_codebook(x.device) if is_nf4 else scales
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # the interpreter's bf16/fp16 arithmetic is wrong, so it multiplies in fp32; compiled, W' is cast to x's dtype
    dot_dtype = tl.float32 if (x.dtype == torch.float32 or interpret) else \
        (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16)
    # split-K programs write fp32 partial sums, added below; a single split writes the output directly
    out = torch.empty((config.split_k, M, N), device=x.device,
                      dtype=x.dtype if config.split_k == 1 else torch.float32)
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n), config.split_k)
    w4a16_kernel[grid](
        x, weight.packed, scales, codebook, out,
        M, N, K,
        x.stride(0), x.stride(1), weight.packed.stride(0), weight.packed.stride(1),
        scales.stride(0), scales.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GROUP_SIZE=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, IS_NF4=is_nf4, DOT_DTYPE=dot_dtype,
        INPUT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out[0] if config.split_k == 1 else out.sum(dim=0).to(x.dtype)
    # END SOLUTION


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
    # BEGIN SOLUTION
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF_K: tl.constexpr = BLOCK_K // 2  # packed bytes per row per step
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE  # scales per row per step
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF_K)  # byte j of a step holds columns 2j (low nibble) and 2j + 1 (high nibble)
    mask_m, mask_n = offs_m < M, offs_n < N
    steps = K // (BLOCK_K * SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation
    for step in range(pid_s * steps, (pid_s + 1) * steps):
        k0 = step * BLOCK_K
        # activations, split into even and odd columns to match the nibbles: (BLOCK_M, HALF_K) each
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_rows + (k0 + 2 * offs_j)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
        x_odd = tl.load(x_rows + (k0 + 2 * offs_j + 1)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
        # weight codes: (BLOCK_N, HALF_K) bytes, the only large read of the kernel
        packed = tl.load(packed_ptr + offs_n[:, None] * stride_pn + (k0 // 2 + offs_j)[None, :] * stride_pk,
                         mask=mask_n[:, None], other=0)
        code_even = (packed & 0xF).to(tl.int32)
        code_odd = (packed >> 4).to(tl.int32)
        if IS_NF4:
            # a 16-entry gather: the codebook stays in L1 after the first step
            w_even = tl.load(codebook_ptr + code_even)
            w_odd = tl.load(codebook_ptr + code_odd)
        else:
            w_even = (code_even - 8).to(tl.float32)
            w_odd = (code_odd - 8).to(tl.float32)
        # one scale per (row, group); byte j lies in group j // (GROUP_SIZE / 2) of this step
        if GROUPS == 1:
            scale = tl.load(scales_ptr + offs_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=mask_n, other=0.0)
            w_even = w_even * scale[:, None]
            w_odd = w_odd * scale[:, None]
        else:
            groups = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
            scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + groups[None, :] * stride_sg,
                            mask=mask_n[:, None], other=0.0)  # (BLOCK_N, GROUPS)
            w_even = tl.reshape(tl.reshape(w_even, (BLOCK_N, GROUPS, GROUP_SIZE // 2)) * scale[:, :, None],
                                (BLOCK_N, HALF_K))
            w_odd = tl.reshape(tl.reshape(w_odd, (BLOCK_N, GROUPS, GROUP_SIZE // 2)) * scale[:, :, None],
                               (BLOCK_N, HALF_K))
        # y += x_even W'_even^T + x_odd W'_odd^T: (BLOCK_M, HALF_K) @ (HALF_K, BLOCK_N)
        acc += tl.dot(x_even.to(DOT_DTYPE), tl.trans(w_even.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
        acc += tl.dot(x_odd.to(DOT_DTYPE), tl.trans(w_odd.to(DOT_DTYPE)), input_precision=INPUT_PRECISION)
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    # END SOLUTION
