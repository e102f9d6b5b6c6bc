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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: flash_attn_bwd is not implemented yet (lab07_flash_attention/flash_bwd.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _bwd_preprocess_kernel is not implemented yet (lab07_flash_attention/flash_bwd.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _bwd_dkdv_kernel is not implemented yet (lab07_flash_attention/flash_bwd.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _bwd_dkdv_inner is not implemented yet (lab07_flash_attention/flash_bwd.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _bwd_dq_kernel is not implemented yet (lab07_flash_attention/flash_bwd.py)")


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
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _bwd_dq_inner is not implemented yet (lab07_flash_attention/flash_bwd.py)")
