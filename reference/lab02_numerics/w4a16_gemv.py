"""W4A16 for decode (M <= 4): a split-K GEMV over pre-shuffled 4-bit weights, one scale multiply per group.

Not a task of the lab: the reference's fast path, to read after writing w4a16.py (the graded kernel stays the simple
tiled one). Why the tiled kernel is slow at M = 1 (results/ and the README have the figures): each step does two
`tl.dot`s on 16-row tiles that are 15/16 padding, transposes one operand and reshapes the scales (register layout
conversions), and gathers x at stride 2 to match the nibbles. A decode GEMV moves N K / 2 bytes of codes and does
2 N K flops, far below the tensor cores' reach: it should run at the memory's speed. This kernel is built for that
(the techniques of Marlin, Frantar et al. 2024, arXiv:2408.11743, and gemlite, in Triton):

1. GEMV, not tl.dot: for M <= 4 each program multiplies a slice of x by a slice of codes elementwise on the CUDA
   cores and keeps fp32 sums per lane, reduced once at its end.
2. Pre-shuffled weights (`prepare_w4a16`, once, at load time). The codes of each group of P columns are stored as
   P / 8 int32 words per row, group-major and with the rows innermost: words[g, w, n] holds, at bits 4i..4i+3, the
   code of column g P + i (P / 8) + w (i = 0..7). A program's weights for one group are BLOCK_N contiguous words per
   w, so a thread loads 4 neighbouring rows' words in one 16-byte access, and those 4 words share their columns:
   one value of x serves 4 weights. Shifting a word by 4i gives nibble i, whose columns g P + i P/8 + w are
   contiguous in x for consecutive w. (Rows innermost measured 1.3x faster at K = N = 4096 and 1.5x at 8192 on an
   H200 than words innermost, where each thread's words had distinct columns and the loads of x, not DRAM, were the
   bottleneck: L1 at 81% of its peak, DRAM at 19%.)
3. Codes to floats without a conversion instruction: OR-ing a 4-bit code q into the mantissa of 2^23 gives the
   float 2^23 + q exactly, so

       v(q) = bitcast_f32(q | 0x4B000000) - (2^23 + 8) = q - 8        (int4; NF4 looks q up in the codebook)

   costs one logic op and one add, not an int-to-float conversion (a quarter-rate instruction).
4. Scales once per group: each step covers exactly one group, so the scale multiplies the group's partial sum, not
   every weight:

       y[m, n] = sum_g s[n, g] sum_{k in g} v(q[n, k]) x[m, k]

   Scales are stored group-major too, (K / P, N) fp32, so a program's BLOCK_N scales are contiguous.
5. Split-K across the whole GPU: at K = N = 4096 there are only 16 tiles of 256 rows; SPLIT_K programs share each
   tile's K range and add their fp32 partial sums with atomics into a zeroed buffer, so the grid covers every SM
   several times (adding in bf16 instead saves the final cast but measured errors up to 2e-2 of max|y|).

Measured on an H200 (results/h200/run3.txt, CUDA graphs): 0.74x the bf16 matmul's time at K = N = 4096 and 0.64x at
8192 for M = 1 (the target was 0.4x); 0.83x / 0.92x at M = 2; NF4 1.5x / 1.7x. What limits it (ncu, K = N = 8192,
M = 1, results/h200/ncu_gemv_rows_inner.txt): the ALU pipe, at 61% of its peak with DRAM at 30%: the shift and the
mask per weight are integer work beside the fp32 add and FMA. (Masking nibbles in place, without the shift, measured
no faster.) Marlin and gemlite turn two codes into a packed half2 with one lop3 and do the multiply-adds on half2;
Triton has no packed half2 arithmetic. NF4's codebook gather makes the L1 the bottleneck instead (86%).

Not used, and why: CUDA graphs belong to the caller (a decode step captures all its layers at once; the benchmark
times graph-captured calls); autotuning is against the kit's rules (fixed, commented blocks, from the benchmark's
--sweep on an H200).

Usage:
    fast = prepare_w4a16(int4_quantize(w, group_size=128))   # or an NF4Weight; once, at load time
    y = w4a16_fast(x, fast)                                  # M <= 4: this GEMV; larger M: w4a16.w4a16_matmul
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

GEMV_MAX_M = 4  # above this many rows the tiled tensor-core kernel (w4a16_matmul) was faster on an H200
CODES_PER_WORD = 8  # 4-bit codes per int32 word

# -----------------------------------------------------------------------------
# Config and the prepared weight


@dataclass(frozen=True, kw_only=True)
class GemvConfig:
    """block_n: output rows per program (a power of two >= 16). split_k: programs sharing one tile's K range (a
    power of two dividing the number of groups). num_warps: warps per program."""

    block_n: int = 128
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
        words: (K / P, P / 8, N) int32, group-major, rows innermost; bits 4i..4i+3 of words[g, w, n] hold the code
            (0..15) of row n's column g P + i P / 8 + w.
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
    """(N, K) codes in 0..15 -> (K / P, P / 8, N) int32 words of the GEMV layout (see the module docstring)."""
    N, K = codes.shape
    words_per_group = group_size // CODES_PER_WORD
    # column g P + i W + w goes to word (g, w, n), nibble i: view K as (G, 8, W), rows innermost, nibbles last
    nibbles = codes.to(torch.int64).reshape(N, K // group_size, CODES_PER_WORD, words_per_group)
    nibbles = nibbles.permute(1, 3, 0, 2)  # (G, W, N, 8)
    shifts = 4 * torch.arange(CODES_PER_WORD, device=codes.device, dtype=torch.int64)
    words = (nibbles << shifts).sum(dim=-1)  # 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as a signed int32
    return words.to(torch.int32).contiguous()


def unshuffle_codes(words: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of shuffle_codes: (K / P, P / 8, N) int32 -> (N, K) int64 codes in 0..15."""
    G, W, N = words.shape
    shifts = 4 * torch.arange(CODES_PER_WORD, device=words.device, dtype=torch.int64)
    nibbles = (words.to(torch.int64)[..., None] >> shifts) % 16  # (G, W, N, 8)
    return nibbles.permute(2, 0, 3, 1).reshape(N, G * group_size)


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
    """Fixed tiles, from the H200 sweeps (results/h200/gemv_sweep*.json): 256 rows per program at M = 1, 128 at
    M = 2..4 (the (BLOCK_M, P / 8, BLOCK_N) sums live in registers); split K until the grid covers every SM 8 times at
    M = 1 and 4 times above (down to one group per program). Under the interpreter, one split of 16 rows.
    """
    if device.type != "cuda":
        return GemvConfig(block_n=16, split_k=1)
    block_n, waves = (256, 8) if M == 1 else (128, 4)
    target = waves * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    groups, split_k = K // group_size, 1
    while triton.cdiv(N, block_n) * split_k < target and groups % (2 * split_k) == 0:
        split_k *= 2
    return GemvConfig(block_n=block_n, split_k=split_k, num_warps=4)


def w4a16_fast(x: torch.Tensor, prepared: PreparedW4A16, *, config: GemvConfig | None = None) -> torch.Tensor:
    """y = x W'^T: the GEMV kernel for M <= GEMV_MAX_M (4), w4a16_matmul (the tiled kernel) above.

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
    BLOCK_M: tl.constexpr,  # next power of two >= M (<= 4): every row of x in one program
    BLOCK_N: tl.constexpr,  # output rows per program
    SPLIT_K: tl.constexpr,  # programs sharing a tile's groups; > 1 adds fp32 partial sums atomically
    IS_NF4: tl.constexpr,  # codebook lookup instead of q - 8
):
    """Program (n, s) computes y[:, n*BLOCK_N:(n+1)*BLOCK_N] over groups s*groups_per_split .. (s+1)*groups_per_split
    - 1 (the s-th of SPLIT_K slices of K). Grid axis 0 indexes N tiles, axis 1 K slices. Masks: rows of x beyond M,
    rows of W beyond N.

    Every tensor is rank 3, (BLOCK_M, WORDS, BLOCK_N), from its load on: x is (BLOCK_M, WORDS, 1), the words and the
    scales (1, WORDS or 1, BLOCK_N), so the broadcasts need no layout conversion."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    WORDS: tl.constexpr = GROUP_SIZE // 8  # int32 words per row per group
    rows_x = tl.arange(0, BLOCK_M)[:, None, None]  # every row of x
    word = tl.arange(0, WORDS)[None, :, None]
    rows_w = (tl.arange(0, BLOCK_N) + pid_n * BLOCK_N)[None, None, :]  # this program's rows of W (columns of y)
    in_m = rows_x < M
    in_n = rows_w < N
    # fp32 sums per lane, reduced over WORDS once, after the loop (a reduction per group costs cross-lane shuffles)
    acc = tl.zeros((BLOCK_M, WORDS, BLOCK_N), tl.float32)
    for g in range(pid_s * groups_per_split, (pid_s + 1) * groups_per_split):
        # the tile's codes for this group: WORDS runs of BLOCK_N contiguous int32, (1, WORDS, BLOCK_N)
        words = tl.load(words_ptr + (g * WORDS + word) * N + rows_w, mask=in_n, other=0)
        scale = tl.load(scales_ptr + g * N + rows_w, mask=in_n, other=0.0)  # (1, 1, BLOCK_N), once per group
        partial = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(8):
            # nibble i of every word: columns g*P + i*WORDS .. g*P + (i+1)*WORDS - 1, contiguous in x as well
            codes = (words >> (4 * i)) & 0xF  # in 0..15 (& drops the sign of word >> 28)
            columns = g * GROUP_SIZE + i * WORDS + word
            x = tl.load(x_ptr + rows_x * stride_xm + columns * stride_xk, mask=in_m,
                        other=0.0).to(tl.float32)  # (BLOCK_M, WORDS, 1); fp32: the interpreter's bf16 math is wrong
            if IS_NF4:
                values = tl.load(codebook_ptr + codes)  # a 16-entry gather that stays in L1
            else:
                # the float 2^23 + q, exactly (q fills the low mantissa bits), minus 2^23 + 8: q - 8, no conversion
                values = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            partial += x * values  # one FMA per weight and row of x, no reduction
        acc += partial * scale  # one multiply per (row, word, group), not per weight
    acc = tl.sum(acc, axis=1)  # (BLOCK_M, BLOCK_N)
    rows_x, rows_w = tl.arange(0, BLOCK_M)[:, None], (tl.arange(0, BLOCK_N) + pid_n * BLOCK_N)[None, :]
    out = out_ptr + rows_x * stride_om + rows_w * stride_on
    mask = (rows_x < M) & (rows_w < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
