"""FlashAttention-2 backward in Triton: dQ, dK, dV from Q, K, V, O, L and dO, without the N x N matrices.

What it saves: autograd through naive attention keeps P = softmax(S), (B, H, Nq, Nk), for the backward. Here P is
recomputed tile by tile from the logsumexp L the forward saved (one fp32 per row), so the backward also needs O(N)
memory, and reads Q, K, V, dO a few times instead of writing and reading P.

Algorithm 2 of Dao 2023, "FlashAttention-2", arXiv:2307.08691 (the equations are in flash_torch.py):

    preprocess:  D_i = rowsum(dO_i * O_i)        (B, H, Nq), the "delta trick": rowsum(P * dP) = rowsum(dO * O)
    dK/dV kernel (K/V-outer loop, FA-2's order): one program owns K_j, V_j and loops over query tiles i:
                 P = exp(S - L),  dV_j += P^T dO_i,  dP = dO_i V_j^T,  dS = P * (dP - D_i),  dK_j += dS^T Q_i
    dQ kernel    (Q-outer loop): one program owns Q_i and loops over K/V tiles j:  dQ_i += dS K_j

Why two kernels: with the K/V-outer loop every query tile's dQ_i gets a contribution from every program, which needs
atomic adds (contended, and the sum order then changes from run to run). A second pass that owns dQ_i recomputes S
and dP (2 more matmuls: 7 instead of 5) but writes each output exactly once: by default the backward is
DETERMINISTIC, bit-for-bit the same on every run. `BackwardConfig(deterministic=False)` instead adds dS K_j into an
fp32 dQ buffer with atomics inside the dK/dV kernel (what FlashAttention-2's CUDA code does): 5 matmuls, no dQ
kernel, but NOT deterministic (the float sums arrive in a different order on every run); on an H100 it was 3x slower
(atomic contention), see results/h100_run1_sweep.json. On a GPU the dQ kernel runs on a second CUDA stream, next to
the dK/dV kernel: each fills the SMs the other's tail leaves idle (3.71 -> 3.43 ms at the leaderboard shape).

GQA: the program for K/V head h_kv also loops over the H / H_kv query heads that share it, so dK and dV are summed in
registers, never with atomics, and K/V are never copied. Causal masking skips the tiles that the forward skipped and
masks only the diagonal ones, as in flash_fwd.py; scores are in the log2 domain (exp2, log2(e) folded into the scale).

Usage:
    dq, dk, dv = flash_attn_bwd(q, k, v, o, lse, do, causal=True)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .flash_fwd import LOG2_E, KernelConfig, check_attention_inputs, dot_precision

# -----------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True, kw_only=True)
class BackwardConfig:
    """Launch parameters of the two backward kernels.

    dkdv: block_n = K/V rows a program owns, block_m = query rows per step (the preprocess uses block_m rows too).
    dq: block_m = query rows a program owns, block_n = K/V rows per step.
    """

    dkdv: KernelConfig = field(default_factory=KernelConfig)
    dq: KernelConfig = field(default_factory=KernelConfig)
    deterministic: bool = True  # False: dQ by fp32 atomics in the dK/dV kernel (no dQ kernel; run-to-run noise)
    overlap_dq: bool = True  # on CUDA, run the dQ kernel on a second stream, concurrently with the dK/dV kernel

    def __post_init__(self) -> None:
        for name in ("dkdv", "dq"):
            if not isinstance(getattr(self, name), KernelConfig):
                raise TypeError(f"BackwardConfig.{name} must be a KernelConfig, got {type(getattr(self, name))}")


def bwd_config(q: torch.Tensor) -> BackwardConfig:
    """Block sizes per device, fixed and commented (no autotuning)."""
    if q.device.type != "cuda":
        # the interpreter: few mid-sized tiles; 32 still leaves ragged and diagonal tiles in the tests' shapes
        small = KernelConfig(block_m=32, block_n=32, num_warps=1, num_stages=1)
        return BackwardConfig(dkdv=small, dq=small)
    if q.dtype == torch.float32:
        # correctness runs on a GPU: fp32 tiles are twice as large, keep them small enough for shared memory
        return BackwardConfig(dkdv=KernelConfig(block_m=32, block_n=64, num_warps=4, num_stages=1),
                              dq=KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=1))
    # Hopper, bf16/fp16. The program that owns a tile keeps it, and its fp32 gradient accumulators, in registers;
    # the streamed tiles are pipelined through shared memory. Chosen by benchmark.py --sweep on an H100
    # (results/h100_run1_sweep.json): at D = 64, causal N = 16384, dK/dV on 64 x 64 tiles took 3.80 ms against 4.38
    # for 64 x 128 (register pressure), and the dQ kernel was best with 128 x 64 tiles and 4 warps (3.65 ms in all).
    if q.shape[-1] <= 64:
        return BackwardConfig(dkdv=KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
                              dq=KernelConfig(block_m=128, block_n=64, num_warps=4, num_stages=3))
    # D = 128 (B2 H16 N4096 causal): 1.05 ms with these, 1.11 ms with 64 x 128 dK/dV tiles and 8 warps
    return BackwardConfig(dkdv=KernelConfig(block_m=32, block_n=64, num_warps=4, num_stages=4),
                          dq=KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2))


# -----------------------------------------------------------------------------
# Public entry point


def flash_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    config: BackwardConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward: a preprocess pass, the dK/dV kernel and the dQ kernel. Deterministic.

    Args:
        q: (B, H, Nq, D); k, v: (B, H_kv, Nk, D), as given to `flash_attn_fwd`. Any strides.
        o: (B, H, Nq, D), the forward's output; lse: (B, H, Nq) float32, its logsumexp.
        do: (B, H, Nq, D), dLoss/dO, same dtype as q. Any strides.
        causal, sm_scale: as in the forward.
        config: launch parameters; default `bwd_config(q)`, chosen per device.

    Returns:
        dq (B, H, Nq, D), dk and dv (B, H_kv, Nk, D), contiguous, in q's dtype (accumulated in fp32).

    Raises:
        ValueError, TypeError: as `check_attention_inputs`, or when o, lse, do do not match q.
    """
    # BEGIN SOLUTION
    check_attention_inputs(q, k, v)
    B, H, Nq, D = q.shape
    H_kv, Nk = k.shape[1], k.shape[2]
    for name, t in (("o", o), ("do", do)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} must match q {tuple(q.shape)} {q.dtype} on {q.device}")
    if lse.shape != (B, H, Nq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {(B, H, Nq)}, got {lse.dtype} {tuple(lse.shape)}")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    config = config or bwd_config(q)
    lse = lse.contiguous()
    precision = dot_precision(q.dtype)

    # 1. preprocess: delta = rowsum(dO * O), and L moved to the log2 domain (+inf for rows with no key, so P = 0)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    pre_m = config.dkdv.block_m
    _bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m), B * H)](
        o, do, lse, delta, lse2, Nq, H, *o.stride(), *do.stride(),
        HEAD_DIM=D, BLOCK_M=pre_m,
    )

    # The dK/dV and dQ kernels only read what the preprocess wrote: on a GPU they can run side by side, the dQ kernel
    # on a second stream, so that each fills the SMs the other's last (lightest) programs leave idle.
    overlap = config.overlap_dq and config.deterministic and q.device.type == "cuda"
    if overlap:
        main_stream, side_stream = torch.cuda.current_stream(q.device), torch.cuda.Stream(device=q.device)
        side_stream.wait_stream(main_stream)  # after the preprocess

    # 2. dK, dV: one program per (K/V tile, batch, K/V head), looping over the query heads of its group
    dk = torch.empty((B, H_kv, Nk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty_like(dk)
    # the atomic variant adds into a zeroed fp32 buffer (contiguous (B, H, Nq, D)); the other never touches it
    dq_acc = torch.zeros((B, H, Nq, D) if not config.deterministic else (1,), dtype=torch.float32, device=q.device)
    c = config.dkdv
    _bwd_dkdv_kernel[(triton.cdiv(Nk, c.block_n), B * H_kv)](
        q, k, v, do, lse2, delta, dk, dv, dq_acc,
        sm_scale, sm_scale * LOG2_E, Nq, Nk, H, H_kv, H // H_kv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
        CAUSAL=causal, HEAD_DIM=D, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        EVEN_M=Nq % c.block_m == 0, EVEN_N=Nk % c.block_n == 0, ATOMIC_DQ=not config.deterministic,
        INPUT_PRECISION=precision, num_warps=c.num_warps, num_stages=c.num_stages,
    )

    # 3. dQ: one program per (query tile, batch, head), looping over K/V tiles like the forward
    if not config.deterministic:
        return dq_acc.to(q.dtype), dk, dv  # accumulated by atomics in step 2
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    c = config.dq
    with torch.cuda.stream(side_stream) if overlap else contextlib.nullcontext():
        _bwd_dq_kernel[(triton.cdiv(Nq, c.block_m), B * H)](
            q, k, v, do, lse2, delta, dq,
            sm_scale, sm_scale * LOG2_E, Nq, Nk, H, H // H_kv,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            CAUSAL=causal, HEAD_DIM=D, BLOCK_M=c.block_m, BLOCK_N=c.block_n, EVEN_M=Nq % c.block_m == 0,
            INPUT_PRECISION=precision, num_warps=c.num_warps, num_stages=c.num_stages,
        )
    if overlap:
        # dq is used on the main stream from here on; every buffer freed below is reused only after this point
        main_stream.wait_stream(side_stream)
    return dq, dk, dv
    # END SOLUTION


# -----------------------------------------------------------------------------
# Kernels, in launch order


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, LSE, DELTA, LSE2,
    Nq, H,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program, power of two
):
    """Program (m, bh) writes DELTA and LSE2 (both contiguous (B, H, Nq) fp32) for BLOCK_M rows of head bh."""
    # BEGIN SOLUTION
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = rows < Nq
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + rows[:, None] * stride_on + offs_d[None, :] * stride_od, mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=row_mask[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # D_i = rowsum(dO * O), in fp32
    row_base = pid_bh.to(tl.int64) * Nq
    lse = tl.load(LSE + row_base + rows, mask=row_mask, other=0.0)
    # log2 domain for exp2; an empty row (L = -inf) becomes +inf so exp2(s - L) = 0 instead of nan
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + row_base + rows, delta, mask=row_mask)
    tl.store(LSE2 + row_base + rows, lse2, mask=row_mask)
    # END SOLUTION


@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    Q, K, V, DO, LSE2, DELTA, DK, DV, DQ_ACC,
    # sizes and scalars
    sm_scale, qk_scale,  # qk_scale = sm_scale * log2(e)
    Nq, Nk, H, H_KV, GROUP,
    # strides (elements); DV has DK's strides (both allocated here, contiguous)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    # meta-parameters
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step, power of two >= 16
    BLOCK_N: tl.constexpr,  # K/V rows this program owns, power of two >= 16
    EVEN_M: tl.constexpr,  # Nq % BLOCK_M == 0: query loads need no row mask
    EVEN_N: tl.constexpr,  # Nk % BLOCK_N == 0: K/V loads and dK/dV stores need no mask
    ATOMIC_DQ: tl.constexpr,  # also add dS K_j * scale into DQ_ACC (fp32, contiguous (B, H, Nq, D)) with atomics
    INPUT_PRECISION: tl.constexpr,
):
    """Program (n, b * H_kv + h_kv) writes dK and dV for K/V rows [n * BLOCK_N, (n + 1) * BLOCK_N) of one K/V head.

    Grid axis 0 indexes the K/V tile, axis 1 the (batch, K/V head) pair. The program loops over the GROUP query
    heads that share this K/V head and, for each, over the query tiles that can see its keys.
    """
    # BEGIN SOLUTION
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    h_kv = pid_bh % H_KV
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # K_j and V_j stay in registers for the whole loop; padded rows (past Nk) read zeros and are never stored
    k_ptrs = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh \
        + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh \
        + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if EVEN_N:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=cols[:, None] < Nk, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < Nk, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)  # fp32 accumulators, summed over the group's heads
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query ranges: rows before `lo` see none of these keys (skipped); rows in [lo, mid) see some (diagonal tiles,
    # causal mask applied); rows from `mid` on see all of them (no mask arithmetic).
    causal_offset = Nk - Nq  # query i sees key j iff j <= i + causal_offset
    if CAUSAL:
        q_tiles_end = tl.cdiv(Nq, BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M,
                         q_tiles_end)
        lo = tl.minimum(tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M, mid)
    else:
        lo = 0
        mid = 0
    for g in range(GROUP):
        h = h_kv * GROUP + g  # query heads h_kv * GROUP ... share this K/V head
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        row_base = (b * H + h).to(tl.int64) * Nq  # LSE2 and DELTA are contiguous (B, H, Nq)
        dq_base = DQ_ACC + row_base * HEAD_DIM
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base, dq_base,
                                 cols, offs_d, stride_qn, stride_qd, stride_don, stride_dod, lo, mid, Nq,
                                 causal_offset, sm_scale, qk_scale, MASKED=True, EVEN_M=EVEN_M, BLOCK_M=BLOCK_M,
                                 ATOMIC_DQ=ATOMIC_DQ, HEAD_DIM=HEAD_DIM, INPUT_PRECISION=INPUT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE2 + row_base, DELTA + row_base, dq_base,
                                 cols, offs_d, stride_qn, stride_qd, stride_don, stride_dod, mid, Nq, Nq,
                                 causal_offset, sm_scale, qk_scale, MASKED=False, EVEN_M=EVEN_M, BLOCK_M=BLOCK_M,
                                 ATOMIC_DQ=ATOMIC_DQ, HEAD_DIM=HEAD_DIM, INPUT_PRECISION=INPUT_PRECISION)

    dk = dk * sm_scale  # dS was taken w.r.t. the scaled scores: dK = dS^T Q * scale
    dk_ptrs = DK + b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh \
        + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b.to(tl.int64) * stride_dkb + h_kv.to(tl.int64) * stride_dkh \
        + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    if EVEN_N:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=cols[:, None] < Nk)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < Nk)
    # END SOLUTION


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse2_base, delta_base, dq_base, cols, offs_d,
    stride_qn, stride_qd, stride_don, stride_dod,
    lo, hi, Nq, causal_offset, sm_scale, qk_scale,
    MASKED: tl.constexpr,  # apply the causal mask (diagonal tiles)
    EVEN_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Accumulate dK_j, dV_j over query tiles [lo, hi) of one head. Works on transposed tiles (keys along rows)
    so that the owned K_j, V_j are the left operands and nothing large is transposed in registers."""
    # BEGIN SOLUTION
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
        do_ptrs = do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod
        if EVEN_M:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse2 = tl.load(lse2_base + rows)
            delta = tl.load(delta_base + rows)
        else:
            # rows past Nq: q = dO = 0 and L = +inf make P = 0, so they add nothing
            q = tl.load(q_ptrs, mask=rows[:, None] < Nq, other=0.0)
            do = tl.load(do_ptrs, mask=rows[:, None] < Nq, other=0.0)
            lse2 = tl.load(lse2_base + rows, mask=rows < Nq, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=rows < Nq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # S^T (BLOCK_N, BLOCK_M), fp32
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])  # P^T = exp(S - L), recomputed
        if MASKED:
            p_t = tl.where(cols[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)  # dV_j += P^T dO_i
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # dP^T = V_j dO_i^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P * (dP - D_i)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)  # dK_j += dS^T Q_i
        if ATOMIC_DQ:
            # dQ_i += dS K_j * scale, added by every program that sees Q_i: atomics, in no fixed order
            dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=INPUT_PRECISION) * sm_scale
            tl.atomic_add(dq_base + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=rows[:, None] < Nq)
    return dk, dv
    # END SOLUTION


@triton.jit
def _bwd_dq_kernel(
    # pointers
    Q, K, V, DO, LSE2, DELTA, DQ,
    # sizes and scalars
    sm_scale, qk_scale,
    Nq, Nk, H, GROUP,
    # strides (elements)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    # meta-parameters
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows this program owns, power of two >= 16
    BLOCK_N: tl.constexpr,  # K/V rows per step, power of two >= 16
    EVEN_M: tl.constexpr,  # Nq % BLOCK_M == 0
    INPUT_PRECISION: tl.constexpr,
):
    """Program (m, b * H + h) writes dQ for query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of head h.

    Grid axis 0 indexes the query tile (reversed under causal masking, longest first), axis 1 the (batch, head) pair.
    The key ranges (full tiles, then masked ones, then skipped) are the forward's.
    """
    # BEGIN SOLUTION
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    h_kv = h // GROUP
    if CAUSAL:
        start_m = (tl.num_programs(0) - 1 - pid_m) * BLOCK_M
    else:
        start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
        + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh \
        + rows[:, None] * stride_don + offs_d[None, :] * stride_dod
    row_base = pid_bh.to(tl.int64) * Nq
    if EVEN_M:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse2 = tl.load(LSE2 + row_base + rows)
        delta = tl.load(DELTA + row_base + rows)
    else:
        q = tl.load(q_ptrs, mask=rows[:, None] < Nq, other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] < Nq, other=0.0)
        lse2 = tl.load(LSE2 + row_base + rows, mask=rows < Nq, other=float("inf"))
        delta = tl.load(DELTA + row_base + rows, mask=rows < Nq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # fp32 accumulation

    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    causal_offset = Nk - Nq
    if CAUSAL:
        full_end = tl.maximum(tl.minimum(start_m + causal_offset + 1, Nk), 0) // BLOCK_N * BLOCK_N
        end = tl.maximum(tl.minimum(start_m + BLOCK_M + causal_offset, Nk), 0)
    else:
        full_end = Nk // BLOCK_N * BLOCK_N
        end = Nk
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, rows, offs_n, offs_d,
                       stride_kn, stride_kd, stride_vn, stride_vd, 0, full_end, Nk, causal_offset, qk_scale,
                       MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, INPUT_PRECISION=INPUT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, rows, offs_n, offs_d,
                       stride_kn, stride_kd, stride_vn, stride_vd, full_end, end, Nk, causal_offset, qk_scale,
                       MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, INPUT_PRECISION=INPUT_PRECISION)
    dq = dq * sm_scale
    dq_ptrs = DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh \
        + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows[:, None] < Nq)
    # END SOLUTION


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, rows, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd,
    lo, hi, Nk, causal_offset, qk_scale,
    MASKED: tl.constexpr,  # bounds and causal masks (the forward's diagonal / ragged tiles)
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Accumulate dQ_i over K/V tiles [lo, hi): dQ_i += dS K_j, with P and dP recomputed."""
    # BEGIN SOLUTION
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < Nk, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < Nk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N), fp32
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            visible = cols[None, :] < Nk
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # dP = dO_i V_j^T
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)  # dQ_i += dS K_j
    return dq
    # END SOLUTION
