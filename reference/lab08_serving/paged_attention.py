"""Paged attention: attention over a KV cache scattered in fixed-size blocks, read through each sequence's block table.

What it saves: the cache needs no contiguous per-request reservation (block_manager.py), and the kernel reads each K/V
block where it lies, so no gather copy is made. Decoding (one query token per sequence) is bound by the bytes of K/V
read; a good paged kernel reads them as fast as a contiguous one.

PagedAttention (Kwon et al. 2023, arXiv:2309.06180, Section 4.1). For sequence b with context length n_b and block
table T_b, query head h and its K/V head g = h // P (P = H / H_kv query heads per K/V head):

    row(j)  = T_b[j // block_size] * block_size + j % block_size        where token j's K/V lie in the cache
    s_j     = (q_{b,h} . K[row(j), g]) * scale,   j < n_b
    o_{b,h} = sum_j softmax(s)_j V[row(j), g]

computed with FlashAttention's online softmax (running max m and sum l, Dao 2023, arXiv:2307.08691) over tiles of
BLOCK_N tokens, so scores never leave registers.

GQA-aware: one program owns K/V head g of sequence b together with all its P query heads, so every K/V tile is loaded
once and multiplied by a (P, D) tile of queries (padded to 16 rows, the smallest tl.dot).

Split-K ("flash-decoding", Dao, Haziza, Massa and Sizov 2023): with few sequences, B * H_kv programs leave most SMs
idle. The context is cut into S splits, one program each; split s writes its normalised partial output o_s and its
logsumexp L_s (log2 domain here), and a second kernel merges them:

    L = log2 sum_s 2^(L_s),      o = sum_s 2^(L_s - L) o_s

A split holding no token (a short sequence in a ragged batch) has L_s = -inf, weight 0.

Prefill uses SDPA (`prefill_attention`), not a paged kernel. A prompt's own K/V come straight from the projections, so
prefill is ordinary causal attention, compute-bound, run once per request; SDPA dispatches it to FlashAttention-2 or
cuDNN on a GPU and to a fused kernel on a CPU. Lab 07's FlashAttention would serve as well, but lab 08 must not depend
on another lab's student code. Only a prompt whose prefix is already cached (prefix caching) reads the cache: its
prefix K/V are gathered through the block table once, and the new tokens attend with the causal mask aligned to the
end.

Layouts: k_cache and v_cache (num_blocks, block_size, H_kv, D), one pair per layer; block_tables (B, max_blocks) int32;
context_lens (B,) int32.

Usage:
    o = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens)                 # q (B, H, D)
    o = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, num_splits=8)   # flash-decoding
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels work in the log2 domain
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two for tl.arange, >= 16 for tl.dot
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: the P query heads of a group are padded to this

# -----------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Tile sizes and launch parameters of the decode kernel.

    block_n: tokens per inner-loop step (a power of two >= 16; any cache block size works, each token finds its block).
    num_warps: warps per program.
    num_stages: software-pipelining depth of the K/V loads.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeConfig.block_n ({self.block_n}) must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.num_warps ({self.num_warps}) must be 1, 2, 4, 8 or 16")
        if self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages ({self.num_stages}) must be >= 1")


def decode_config(q: torch.Tensor) -> DecodeConfig:
    """Fixed per device, never autotuned (the course's rule)."""
    if q.device.type != "cuda":
        return DecodeConfig(block_n=16, num_warps=1, num_stages=1)  # the interpreter: small tiles, masks exercised
    # Hopper, bf16, D = 128: a 64-token K tile and V tile are 16 KiB each, so two pipeline stages take 64 KiB of
    # shared memory and three programs fit on an SM: enough bytes in flight to approach the HBM bandwidth.
    return DecodeConfig(block_n=64, num_warps=4, num_stages=2)


def default_num_splits(batch: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Splits per (sequence, K/V head) so that the GPU gets about 4 programs per SM, keeping >= 256 tokens a split.

    One when the (sequence, K/V head) programs alone fill every SM twice: then a split only adds the combine pass
    (measured on an H200 at B64 ctx4096, 8 K/V heads: 3602 GB/s with one split against 3182 with two). One split on
    CPU (the interpreter gains nothing from more programs)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if batch * num_kv_heads >= 2 * sms:
        return 1
    wanted = math.ceil(4 * sms / max(1, batch * num_kv_heads))
    return max(1, min(wanted, max_context_len // 256, 64))


# -----------------------------------------------------------------------------
# Plain PyTorch: gather, then attend


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len tokens of one sequence, copied out of the paged cache in order.

    Args:
        cache: (num_blocks, block_size, H_kv, D), a layer's K or V cache.
        block_table: (max_blocks,) int, the sequence's physical block per logical block.
        context_len: tokens to read, 1 <= context_len <= max_blocks * block_size.

    Returns:
        (context_len, H_kv, D), a copy in the cache's dtype.
    """
    # BEGIN SOLUTION
    block_size = cache.shape[1]
    positions = torch.arange(context_len, device=cache.device)
    blocks = block_table.to(cache.device)[positions // block_size].long()
    return cache[blocks, positions % block_size]  # (context_len, H_kv, D)
    # END SOLUTION


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, *, sm_scale: float | None = None) -> torch.Tensor:
    """Decode attention by gathering each sequence's K/V (the plain version the kernel is checked against).

    Args:
        q: (B, H, D), one query token per sequence.
        k_cache, v_cache: (num_blocks, block_size, H_kv, D), same dtype as q; H_kv divides H.
        block_tables: (B, max_blocks) int.
        context_lens: (B,) int, each in [1, max_blocks * block_size].
        sm_scale: softmax scale, default 1 / sqrt(D).

    Returns:
        (B, H, D) in q's dtype.
    """
    check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, interpreter=False)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    # BEGIN SOLUTION
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for b, n in enumerate(context_lens.tolist()):
        k = gather_kv(k_cache, block_tables[b], n).repeat_interleave(group, dim=1)  # (n, H, D)
        v = gather_kv(v_cache, block_tables[b], n).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], k) * scale  # (H, n)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
        out[b] = torch.einsum("hn,nhd->hd", probs, v)
    return out
    # END SOLUTION


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention of a sequence's last N tokens over its M >= N tokens, through SDPA.

    Query i (the token at position M - N + i) sees keys j <= i + (M - N): the mask aligned to the end. N = M is a
    fresh prompt; N < M a prompt whose first M - N tokens were found in the cache.

    Args:
        q: (N, H, D).
        k, v: (M, H_kv, D), H_kv divides H.
        sm_scale: softmax scale, default 1 / sqrt(D).

    Returns:
        (N, H, D) in q's dtype.
    """
    N, M = q.shape[0], k.shape[0]
    if M < N:
        raise ValueError(f"prefill_attention: {N} queries over only {M} keys (M must be >= N)")
    # BEGIN SOLUTION
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H or H_kv, N or M, D)
    gqa = kh.shape[1] != qh.shape[1]
    if N == M:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=sm_scale, enable_gqa=gqa)
    else:
        visible = torch.ones(N, M, dtype=torch.bool, device=q.device).tril(diagonal=M - N)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=visible, scale=sm_scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)  # (N, H, D)
    # END SOLUTION


# -----------------------------------------------------------------------------
# Public entry point: the Triton decode kernel


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, *, sm_scale: float | None = None, num_splits: int | None = None,
                           max_context_len: int | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """Decode attention straight from the paged cache, in Triton; split-K when num_splits > 1.

    Args:
        q: (B, H, D) queries; fp16/bf16/fp32 on CUDA, fp32 on CPU (the Triton interpreter).
        k_cache, v_cache: (num_blocks, block_size, H_kv, D), q's dtype and device; H_kv divides H. Any strides.
        block_tables: (B, max_blocks) int32; entries past a sequence's last block are never read.
        context_lens: (B,) int32, each in [1, max_blocks * block_size] (checked on CPU only: on a GPU, reading them
            back would cost a synchronisation and break CUDA-graph capture).
        sm_scale: softmax scale, default 1 / sqrt(D).
        num_splits: context splits per sequence (>= 1); default `default_num_splits`.
        max_context_len: the largest context length, for the default num_splits (default: read from context_lens,
            a synchronisation).
        config: tile sizes; default `decode_config(q)`.

    Returns:
        (B, H, D) in q's dtype.

    Raises:
        ValueError / TypeError: shapes, dtypes, devices or a num_splits the kernel does not support.
    """
    check_decode_inputs(q, k_cache, v_cache, block_tables, context_lens, interpreter=True)
    B, H, D = q.shape
    H_kv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    config = config or decode_config(q)
    if num_splits is None:
        longest = max_context_len if max_context_len is not None else int(context_lens.max())
        num_splits = default_num_splits(B, H_kv, longest, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    out = torch.empty_like(q)
    group = H // H_kv
    block_h = max(MIN_DOT_ROWS, triton.next_power_of_2(group))
    split = num_splits > 1
    precision = dot_precision(q.dtype)
    if split:
        partial_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:
        partial_o = partial_lse = out  # never touched when SPLIT is False
    grid = (B, H_kv, num_splits)  # axis 0: sequence, axis 1: K/V head, axis 2: context split
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, out, partial_o, partial_lse,
        scale * LOG2_E, group, num_splits, block_tables.shape[1],
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=D, BLOCK_H=block_h, BLOCK_N=config.block_n, SPLIT=split,
        INPUT_PRECISION=precision, num_stages=config.num_stages, num_warps=config.num_warps,
    )
    if split:
        _merge_splits_kernel[(B, H)](
            partial_o, partial_lse, out, num_splits, *out.stride(),
            HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4 if q.is_cuda else 1,
        )
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full precision ("ieee"), not TF32, so they match a float64 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, *, interpreter: bool) -> None:
    """Raise ValueError/TypeError naming the value and the rule for inputs the decode functions cannot take.

    interpreter: also apply the Triton kernel's rules (dtype and head dim; CPU tensors need TRITON_INTERPRET=1)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be (num_blocks, block_size, H_kv, D), got shape {tuple(cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    B, H, D = q.shape
    H_kv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"the cache's head dim ({k_cache.shape[3]}) differs from q's ({D})")
    if H % H_kv:
        raise ValueError(f"the number of K/V heads ({H_kv}) must divide the number of query heads ({H})")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be (B={B}, max_blocks), got shape {tuple(block_tables.shape)}")
    if context_lens.shape != (B,):
        raise ValueError(f"context_lens must be (B={B},), got shape {tuple(context_lens.shape)}")
    if block_tables.dtype not in (torch.int32, torch.int64) or context_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_tables and context_lens must be int32 (or int64), got {block_tables.dtype}, "
                        f"{context_lens.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"every input must be on one device, got {sorted(str(d) for d in devices)}")
    if q.device.type == "cpu":
        lens = context_lens.tolist()
        capacity = block_tables.shape[1] * k_cache.shape[1]
        if any(n < 1 or n > capacity for n in lens):
            raise ValueError(f"context_lens must lie in [1, max_blocks * block_size = {capacity}], got {lens}")
    if not interpreter:
        return
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype {q.dtype} is not supported by the kernel: use float16, bfloat16 or float32")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D ({D}) must be one of {SUPPORTED_HEAD_DIMS}")
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton "
                             "(common.target.use_target() does it)")
        if q.dtype != torch.float32:
            raise TypeError(f"dtype {q.dtype} needs a CUDA GPU; on CPU (the Triton interpreter) use float32")
    elif q.device.type != "cuda":
        raise ValueError(f"device {q.device} is not supported: use cuda (or cpu through the Triton interpreter)")


# -----------------------------------------------------------------------------
# Kernels


@triton.jit
def _paged_decode_kernel(
    # pointers
    Q, K_cache, V_cache, Block_tables, Context_lens, O, Partial_o, Partial_lse,
    # sizes and scalars
    qk_scale,  # sm_scale * log2(e): scores come out in the log2 domain, ready for exp2
    GROUP,  # P = H // H_kv query heads per K/V head
    num_splits, max_blocks,
    # strides (elements)
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tj,
    stride_ob, stride_oh, stride_od,
    # meta-parameters
    BLOCK_SIZE: tl.constexpr,  # token slots per cache block (any positive size)
    HEAD_DIM: tl.constexpr,  # D, a power of two
    BLOCK_H: tl.constexpr,  # query rows per program: P padded to a power of two >= 16 (tl.dot)
    BLOCK_N: tl.constexpr,  # tokens per step, a power of two >= 16
    SPLIT: tl.constexpr,  # False: write O; True: write this split's partial output and logsumexp
    INPUT_PRECISION: tl.constexpr,
):
    """Program (b, g, s) attends the P query heads of K/V head g of sequence b over split s of its context.

    Grid axis 0 indexes the sequence b, axis 1 the K/V head g, axis 2 the split s (one split: the whole context).
    Split s covers whole tiles: tokens [s * T * BLOCK_N, (s + 1) * T * BLOCK_N) with T = ceil(ceil(n / BLOCK_N) / S).
    """
    # BEGIN SOLUTION
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(Context_lens + b)
    tiles_per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits)
    lo = s * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, n)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = g * GROUP + offs_h  # the query heads of this K/V head; rows >= GROUP are padding
    head_ok = offs_h < GROUP
    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=head_ok[:, None])  # (BLOCK_H, D), loaded once; padding rows are never stored

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)  # un-normalised output, fp32 accumulation
    table = Block_tables + b.to(tl.int64) * stride_tb
    for start in range(lo, hi, BLOCK_N):
        tokens = start + offs_n
        valid = tokens < hi
        # the block table turns each token into a cache row: block T_b[j // bs], slot j % bs
        blocks = tl.load(table + (tokens // BLOCK_SIZE) * stride_tj, mask=valid).to(tl.int64)
        slots = tokens % BLOCK_SIZE
        k_rows = blocks * stride_kb + slots * stride_ks + g * stride_kh  # (BLOCK_N,) offsets of each token's K
        k_ptrs = K_cache + k_rows[:, None] + offs_d[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=valid[:, None])  # (BLOCK_N, D), one load for all P query heads
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_H, BLOCK_N), fp32
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))  # masked tokens read no K: no score
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every tile holds at least one valid token
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = blocks * stride_vb + slots * stride_vs + g * stride_vh
        v_ptrs = V_cache + v_rows[:, None] + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)  # 0, not garbage: p = 0 there, and 0 * NaN is NaN
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    if SPLIT:
        # a split past the end of a short sequence saw no token: l = 0, its partial output 0 with weight 2^-inf = 0
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
        row = (b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * num_splits + s  # partials are contiguous
        tl.store(Partial_o + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=head_ok[:, None])
        tl.store(Partial_lse + row, lse, mask=head_ok)
    else:
        o_ptrs = O + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=head_ok[:, None])
    # END SOLUTION


@triton.jit
def _merge_splits_kernel(
    # pointers
    Partial_o, Partial_lse, O,
    # sizes
    num_splits,
    # strides (elements) of O; the partials are contiguous (B, H, S, D) and (B, H, S)
    stride_ob, stride_oh, stride_od,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
):
    """Program (b, h) merges the S partial outputs of query head h of sequence b: o = sum_s 2^(L_s - L) o_s.

    Grid axis 0 indexes the sequence, axis 1 the query head.
    """
    # BEGIN SOLUTION
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * num_splits + offs_s
    in_range = offs_s < num_splits
    lse = tl.load(Partial_lse + row, mask=in_range, other=float("-inf"))  # (BLOCK_S,)
    weights = tl.math.exp2(lse - tl.max(lse, 0))  # the largest is finite: some split holds the first token
    partial = tl.load(Partial_o + row[:, None] * HEAD_DIM + offs_d[None, :], mask=in_range[:, None], other=0.0)
    o = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights, 0)  # (D,)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d * stride_od, o.to(O.dtype.element_ty))
    # END SOLUTION
