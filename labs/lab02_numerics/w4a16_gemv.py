"""W4A16 for decode (M <= 16): a split-K GEMV over pre-shuffled 4-bit weights, one scale multiply per group.

Not a task of the lab: the reference's fast path, to read after writing w4a16.py (the graded kernel stays the simple
tiled one). Why the tiled kernel is slow at M = 1 (results/ and the README have the figures): each step does two
`tl.dot`s on 16-row tiles that are 15/16 padding, transposes one operand and reshapes the scales (register layout
conversions), and gathers x at stride 2 to match the nibbles. A decode GEMV moves N K / 2 bytes of codes and does
2 N K flops, far below the tensor cores' reach: it should run at the memory's speed. This kernel is built for that
(the techniques of Marlin, Frantar et al. 2024, arXiv:2408.11743, and gemlite, in Triton):

1. GEMV, not tl.dot: for M <= 16 each program multiplies a (BLOCK_M, W) slice of x by a (BLOCK_N, W) slice of codes
   elementwise and sums over W with `tl.sum` (broadcast-multiply-reduce on the CUDA cores).
2. Pre-shuffled weights (`prepare_w4a16`, once, at load time). The codes of each group of P columns are stored as
   P / 8 int32 words per row, group-major: words[g, n, w] holds, at bits 4i..4i+3, the code of column
   g P + i (P / 8) + w (i = 0..7). A program's weights for one group are one contiguous run of BLOCK_N P / 2 bytes,
   and shifting every word by 4i gives the codes of the contiguous columns g P + i P/8 ... g P + (i + 1) P/8 - 1, so
   x is read contiguously too: no transposes, no stride-2 gathers.
3. Scales once per group: each step covers exactly one group, so the scale multiplies the group's partial sum, not
   every weight:

       y[m, n] = sum_g s[n, g] sum_{k in g} v(q[n, k]) x[m, k]      v(q) = q - 8 (int4)  or  codebook[q] (NF4)

   and for int4, sum_k (q - 8) x = sum_k q x - 8 sum_k x, with sum_k x shared by every row of the tile.
   Scales are stored group-major too, (K / P, N) fp32, so a program's BLOCK_N scales are contiguous.
4. Split-K across the whole GPU: at K = N = 4096 there are only 64 tiles of 64 rows; SPLIT_K programs share each
   tile's K range and add their fp32 partial sums with atomics, so the grid covers every SM several times.

Not used, and why: CUDA graphs belong to the caller (a decode step captures all its layers at once; the benchmark
times both eager and graph-captured calls); autotuning is against the kit's rules (fixed, commented blocks).

Usage:
    fast = prepare_w4a16(int4_quantize(w, group_size=128))   # or an NF4Weight; once, at load time
    y = w4a16_fast(x, fast)                                  # M <= 16: this GEMV; larger M: w4a16.w4a16_matmul
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .nf4 import NF4Weight
from .quantize import Int4Weight
from .w4a16 import ACTIVATION_DTYPES, cached_codebook, w4a16_matmul

GEMV_MAX_M = 16  # above this many rows the tiled tensor-core kernel (w4a16_matmul) is the right tool
CODES_PER_WORD = 8  # 4-bit codes per int32 word

# -----------------------------------------------------------------------------
# Config and the prepared weight


@dataclass(frozen=True, kw_only=True)
class GemvConfig:
    """block_n: output rows per program (a power of two >= 16). split_k: programs sharing one tile's K range (a
    power of two dividing the number of groups). num_warps: warps per program."""

    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "split_k", "num_warps"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a positive power of two, got {value}")
        if self.block_n < 16:
            raise ValueError(f"GemvConfig.block_n must be >= 16, got {self.block_n}")


@dataclass(frozen=True, kw_only=True)
class PreparedW4A16:
    """A 4-bit weight in the GEMV layout, with the original kept for M > GEMV_MAX_M.

    Attributes:
        words: (K / P, N, P / 8) int32, group-major; bits 4i..4i+3 of words[g, n, w] hold the code (0..15) of column
            g P + i P / 8 + w.
        scales: (K / P, N) fp32, group-major (NF4's double-quantized scales are dequantized here, once).
        group_size: P (int4's group, NF4's block).
        shape: (N, K).
        is_nf4: codes index the NF4 codebook instead of meaning q + 8.
        source: the Int4Weight or NF4Weight it was made from.
    """

    words: torch.Tensor
    scales: torch.Tensor
    group_size: int
    shape: tuple[int, int]
    is_nf4: bool
    source: Int4Weight | NF4Weight

    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scales.numel() * 4


# -----------------------------------------------------------------------------
# Plain-PyTorch version: the layout, and back


def shuffle_codes(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) codes in 0..15 -> (K / P, N, P / 8) int32 words of the GEMV layout (see the module docstring)."""
    N, K = codes.shape
    words_per_group = group_size // CODES_PER_WORD
    # column g P + i W + w goes to word (g, n, w), nibble i: view K as (G, 8, W) and move the nibble axis last
    nibbles = codes.to(torch.int64).reshape(N, K // group_size, CODES_PER_WORD, words_per_group)
    nibbles = nibbles.permute(1, 0, 3, 2)  # (G, N, W, 8)
    shifts = 4 * torch.arange(CODES_PER_WORD, device=codes.device, dtype=torch.int64)
    words = (nibbles << shifts).sum(dim=-1)  # 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as a signed int32
    return words.to(torch.int32).contiguous()


def unshuffle_codes(words: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of shuffle_codes: (K / P, N, P / 8) int32 -> (N, K) int64 codes in 0..15."""
    G, N, W = words.shape
    shifts = 4 * torch.arange(CODES_PER_WORD, device=words.device, dtype=torch.int64)
    nibbles = (words.to(torch.int64)[..., None] >> shifts) % 16  # (G, N, W, 8)
    return nibbles.permute(1, 0, 3, 2).reshape(N, G * group_size)


def gemv_reference(x: torch.Tensor, prepared: PreparedW4A16) -> torch.Tensor:
    """x (M, K) @ W'^T in fp32, decoded from the GEMV layout (checks the layout, not the kernel)."""
    codes = unshuffle_codes(prepared.words, prepared.group_size)
    if prepared.is_nf4:
        values = cached_codebook(prepared.words.device)[codes]
    else:
        values = (codes - 8).float()
    scales = prepared.scales.t().repeat_interleave(prepared.group_size, dim=1)  # (N, K)
    return x.float() @ (values * scales).t()


# -----------------------------------------------------------------------------
# Public entry points


def prepare_w4a16(weight: Int4Weight | NF4Weight) -> PreparedW4A16:
    """Repack an Int4Weight or NF4Weight into the GEMV layout (once, at load time).

    Raises:
        TypeError: not an Int4Weight or NF4Weight.
        ValueError: a group size that is not a multiple of 8 codes (one int32 word) or not a power of two >= 32.
    """
    if isinstance(weight, NF4Weight):
        is_nf4, group_size, scales = True, weight.block_size, weight.block_scales()  # scales: (N, K / P) fp32
    elif isinstance(weight, Int4Weight):
        is_nf4, group_size, scales = False, weight.group_size, weight.scales
    else:
        raise TypeError(f"prepare_w4a16: weight must be an Int4Weight or NF4Weight, got {type(weight).__name__}")
    if group_size < 32 or (group_size & (group_size - 1)) != 0:
        raise ValueError(f"prepare_w4a16: group_size ({group_size}) must be a power of two >= 32")
    N, K = weight.shape
    byte = weight.packed.to(torch.int64)
    codes = torch.stack((byte % 16, byte // 16), dim=-1).reshape(N, K)  # low nibble first: columns 2j, 2j + 1
    return PreparedW4A16(words=shuffle_codes(codes, group_size), scales=scales.float().t().contiguous(),
                         group_size=group_size, shape=(N, K), is_nf4=is_nf4, source=weight)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_gemv_config(M: int, N: int, K: int, group_size: int, device: torch.device) -> GemvConfig:
    """Fixed tiles: 64 rows per program at M <= 4, fewer as M grows (the (BLOCK_M, BLOCK_N, P / 8) products live in
    registers); split K until the grid covers every SM about 4 times (each split keeps at least 2 groups).

    Not swept on the H200 yet (the benchmark's --sweep times a grid of these); under the interpreter, one split.
    """
    block_n = 64 if M <= 4 else (32 if M <= 8 else 16)
    if device.type != "cuda":
        return GemvConfig(block_n=16, split_k=1)
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    groups, split_k = K // group_size, 1
    while triton.cdiv(N, block_n) * split_k < target and groups % (2 * split_k) == 0 and groups // (2 * split_k) >= 2:
        split_k *= 2
    return GemvConfig(block_n=block_n, split_k=split_k, num_warps=4)


def w4a16_fast(x: torch.Tensor, prepared: PreparedW4A16, *, config: GemvConfig | None = None) -> torch.Tensor:
    """y = x W'^T: the GEMV kernel for M <= GEMV_MAX_M, w4a16_matmul (the tiled kernel) above.

    Args:
        x: (M, K) activations, fp32/fp16/bf16, on the weight's device.
        prepared: from prepare_w4a16.
        config: GEMV tiles; default_gemv_config when None (ignored for M > GEMV_MAX_M).

    Returns:
        (M, N) in x.dtype (accumulated in fp32).

    Raises:
        TypeError: unsupported activation dtype, or not a PreparedW4A16.
        ValueError: x not 2-D, K mismatch, devices differ, or a split_k that does not divide the groups.
    """
    if not isinstance(prepared, PreparedW4A16):
        raise TypeError(f"w4a16_fast: expected a PreparedW4A16 (prepare_w4a16), got {type(prepared).__name__}")
    if not any(x.dtype == dtype for dtype in ACTIVATION_DTYPES):
        raise TypeError(f"w4a16_fast: unsupported activation dtype {x.dtype}; expected one of {ACTIVATION_DTYPES}")
    if x.dim() != 2:
        raise ValueError(f"w4a16_fast: x must be (M, K), got shape {tuple(x.shape)}")
    (M, K), (N, K_w) = x.shape, prepared.shape
    if K != K_w:
        raise ValueError(f"w4a16_fast: x has K = {K} but the weight has K = {K_w}")
    if x.device != prepared.words.device:
        raise ValueError(f"w4a16_fast: x is on {x.device} but the weight is on {prepared.words.device}")
    if M > GEMV_MAX_M:
        return w4a16_matmul(x, prepared.source)
    config = config or default_gemv_config(M, N, K, prepared.group_size, x.device)
    groups = K // prepared.group_size
    if groups % config.split_k:
        raise ValueError(f"w4a16_fast: split_k ({config.split_k}) must divide the number of groups ({groups})")
    # one split writes y directly in x's dtype; several add fp32 partial sums into a zeroed buffer
    out = torch.empty((M, N), device=x.device, dtype=x.dtype) if config.split_k == 1 else \
        torch.zeros((M, N), device=x.device, dtype=torch.float32)
    codebook = cached_codebook(x.device) if prepared.is_nf4 else prepared.scales  # int4 never reads it
    grid = (triton.cdiv(N, config.block_n), config.split_k)
    w4a16_gemv_kernel[grid](
        x, prepared.words, prepared.scales, codebook, out,
        M, N, groups // config.split_k,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        GROUP_SIZE=prepared.group_size, BLOCK_M=max(1, triton.next_power_of_2(M)), BLOCK_N=config.block_n,
        SPLIT_K=config.split_k, IS_NF4=prepared.is_nf4, num_warps=config.num_warps,
    )
    return out if config.split_k == 1 else out.to(x.dtype)


# -----------------------------------------------------------------------------
# The kernel


@triton.jit
def w4a16_gemv_kernel(
    # pointers
    x_ptr, words_ptr, scales_ptr, codebook_ptr, out_ptr,
    # sizes: groups_per_split = (K / P) / SPLIT_K
    M, N, groups_per_split,
    # strides (in elements) of x and out; words and scales are contiguous
    stride_xm, stride_xk, stride_om, stride_on,
    # meta-parameters
    GROUP_SIZE: tl.constexpr,  # P: columns per group, one scale each; a power of two >= 32
    BLOCK_M: tl.constexpr,  # next power of two >= M (<= 16): every row of x in one program
    BLOCK_N: tl.constexpr,  # output rows per program
    SPLIT_K: tl.constexpr,  # programs sharing a tile's groups; > 1 adds fp32 partial sums atomically
    IS_NF4: tl.constexpr,  # codebook lookup instead of q - 8
):
    """Program (n, s) computes y[:, n*BLOCK_N:(n+1)*BLOCK_N] over groups s*groups_per_split .. (s+1)*groups_per_split
    - 1 (the s-th of SPLIT_K slices of K). Grid axis 0 indexes N tiles, axis 1 K slices. Masks: rows of x beyond M,
    rows of W beyond N."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    WORDS: tl.constexpr = GROUP_SIZE // 8  # int32 words per row per group
    rows_x = tl.arange(0, BLOCK_M)  # every row of x
    rows_w = tl.arange(0, BLOCK_N) + pid_n * BLOCK_N  # this program's rows of W (columns of y)
    word = tl.arange(0, WORDS)
    in_m = rows_x < M
    in_n = rows_w < N
    # fp32 sums per lane: (BLOCK_M, BLOCK_N, WORDS), reduced over WORDS once, after the loop. A tl.sum over WORDS
    # inside the loop costs a cross-lane reduction per nibble, which measured 1.9x bf16's time on an H200 at M = 1.
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), tl.float32)
    for g in range(pid_s * groups_per_split, (pid_s + 1) * groups_per_split):
        # the tile's codes for this group: BLOCK_N * P / 2 contiguous bytes, (BLOCK_N, WORDS) int32
        words = tl.load(words_ptr + (g * N + rows_w)[:, None] * WORDS + word[None, :], mask=in_n[:, None],
                        other=0)
        scale = tl.load(scales_ptr + g * N + rows_w, mask=in_n, other=0.0)  # (BLOCK_N,), once per group
        partial = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
        for i in tl.static_range(8):
            # nibble i of every word: columns g*P + i*WORDS .. g*P + (i+1)*WORDS - 1, contiguous in x as well
            codes = (words >> (4 * i)) & 0xF  # (BLOCK_N, WORDS) in 0..15 (& drops the sign of word >> 28)
            columns = g * GROUP_SIZE + i * WORDS + word
            x = tl.load(x_ptr + rows_x[:, None] * stride_xm + columns[None, :] * stride_xk, mask=in_m[:, None],
                        other=0.0).to(tl.float32)  # (BLOCK_M, WORDS); fp32: the interpreter's bf16 math is wrong
            if IS_NF4:
                values = tl.load(codebook_ptr + codes)  # a 16-entry gather that stays in L1
            else:
                values = codes.to(tl.float32)  # q + 8; the 8 comes off below, once per group
                x_sum += x
            partial += x[:, None, :] * values[None, :, :]  # one FMA per weight and row of x, no reduction
        if not IS_NF4:
            partial -= 8.0 * x_sum[:, None, :]
        acc += partial * scale[None, :, None]  # one multiply per (row, word, group), not per weight
    acc = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    out = out_ptr + rows_x[:, None] * stride_om + rows_w[None, :] * stride_on
    mask = in_m[:, None] & in_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)
