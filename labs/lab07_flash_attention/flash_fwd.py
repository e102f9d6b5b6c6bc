"""FlashAttention-2 forward in Triton: O = softmax(Q K^T * scale) V without ever storing the N x N scores.

What it saves: the naive version writes the (B, H, Nq, Nk) score and probability matrices to GPU memory and reads them
back, O(N^2) bytes moved and stored. This kernel keeps one (BLOCK_M, BLOCK_N) tile of scores in registers at a time,
so memory is O(N) (O and the logsumexp L) and the HBM traffic is O(N^2 D / BLOCK_M) instead of O(N^2).

Algorithm 1 of Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691. One program owns one tile of BLOCK_M query rows and streams over the key/value tiles j:

    S_j  = Q_i K_j^T * scale                                 (BLOCK_M, BLOCK_N), fp32
    m'   = max(m, rowmax(S_j))                                the running row max
    P_j  = exp(S_j - m')                                      un-normalised probabilities
    l    = exp(m - m') * l + rowsum(P_j)                      the running row sum
    acc  = exp(m - m') * acc + P_j V_j                        the un-normalised output
    end: O_i = acc / l,   L_i = m + log(l)                    L is saved for the backward

Hopper-friendly details (they are why this beats torch's own FlashAttention-2 build on an H100: 428 against 313
TFLOP/s, causal B4 H32 N4096 D128 bf16, results/h100_benchmark.json):
- exp2 instead of exp: log2(e) is folded into the scale once, and the hardware has a native exp2.
- Causal masking skips the key tiles that are entirely above the diagonal, and splits the loop in two stages: the full
  tiles below the diagonal run without any mask arithmetic, only the few diagonal (or ragged-end) tiles are masked.
- Under causal masking, the programs with the most work (the last query tiles) are launched first.
- GQA/MQA: query head h reads key/value head h // (H / H_kv) through the strides, so K and V are never copied.

Conventions (the same as flash-attn >= 2.1 and common.model.naive_attention): with Nq != Nk the causal mask is aligned
to the bottom-right, query i sees keys j <= i + (Nk - Nq). A query row that sees no key at all gets O = 0, L = -inf.

Usage:
    o, lse = flash_attn_fwd(q, k, v, causal=True)      # q (B, H, Nq, D), k and v (B, H_kv, Nk, D)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2_E)
LN_2 = 0.6931471805599453  # ln(2): converts a log2-domain logsumexp back to natural log
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # powers of two: tl.arange and tl.dot need them, and >= 16 for tl.dot

# -----------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel.

    block_m: query rows per program (power of two, >= 16 for tl.dot).
    block_n: key rows per inner-loop step (power of two, >= 16).
    num_warps: warps per program (4 or 8 on Hopper: 8 for 128-wide tiles at D = 128).
    num_stages: software-pipelining depth of the K/V loads (shared memory grows with it).
    """

    block_m: int = 32
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} ({value}) must be a power of two >= 16 (tl.dot needs it)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps ({self.num_warps}) must be 1, 2, 4, 8 or 16")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages ({self.num_stages}) must be >= 1")


def fwd_config(q: torch.Tensor) -> KernelConfig:
    """Block sizes per device. Fixed and commented, never autotuned (the course's rule)."""
    if q.device.type != "cuda":
        # the interpreter runs each tile op in numpy: few, mid-sized tiles are fastest, and 32 still exercises masks
        return KernelConfig(block_m=32, block_n=32, num_warps=1, num_stages=1)
    if q.dtype == torch.float32:
        # fp32 is for checking correctness on a GPU: 4-byte tiles need small blocks to fit in shared memory
        return KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    # Hopper (H100), bf16/fp16: 128-row query tiles over 8 warps keep the tensor cores busy; K/V tiles of 64 rows
    # with a 3-deep pipeline fit in shared memory at D = 128. Chosen by benchmark.py --sweep on an H100
    # (results/h100_run1_sweep.json): causal D = 128, B4 H32 N4096: 1.19 ms (next best 64 x 64, 4 warps: 1.27 ms);
    # D = 64, B1 H16 N16384: 1.32 ms (4 warps instead of 8: 1.49 ms; 128 x 128 tiles: 1.46 ms).
    return KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


# -----------------------------------------------------------------------------
# Public entry point


def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward (Algorithm 1 of arXiv:2307.08691) in one Triton kernel.

    Args:
        q: (B, H, Nq, D) queries; fp16/bf16/fp32 on CUDA, fp32 on CPU (the Triton interpreter). Any strides.
        k: (B, H_kv, Nk, D) keys, same dtype and device; H_kv divides H (GQA; H_kv = 1 is MQA).
        v: (B, H_kv, Nk, D) values.
        causal: mask key j from query i unless j <= i + (Nk - Nq) (bottom-right aligned).
        sm_scale: the softmax scale; default 1 / sqrt(D).
        config: tile sizes and launch parameters; default `fwd_config(q)`, chosen per device.

    Returns:
        o: (B, H, Nq, D) in q's dtype, contiguous.
        lse: (B, H, Nq) float32, L = logsumexp_j(q_i . k_j * sm_scale) (natural log), -inf for a row with no key.

    Raises:
        ValueError: shapes, head dim or devices that the kernel does not support.
        TypeError: unsupported or mismatched dtypes.
    """
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: flash_attn_fwd is not implemented yet (lab07_flash_attention/flash_fwd.py)")


# -----------------------------------------------------------------------------
# Launcher checks (shared with the backward)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError/TypeError naming the value and the rule for anything the kernels cannot run.

    Non-contiguous inputs are fine: every kernel takes all four strides of every tensor.
    """
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: check_attention_inputs is not implemented yet (lab07_flash_attention/flash_fwd.py)")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full precision ("ieee"), not TF32, so they match a float64 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


# -----------------------------------------------------------------------------
# The kernel


@triton.jit
def _fwd_kernel(
    # pointers
    Q, K, V, O, LSE,
    # sizes and scalars
    qk_scale,  # sm_scale * log2(e): scores come out in the log2 domain, ready for exp2
    Nq, Nk, H, GROUP,  # GROUP = H // H_kv query heads share one K/V head
    # strides (elements)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    # meta-parameters
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # D, a power of two in 16..128
    BLOCK_M: tl.constexpr,  # query rows per program, power of two >= 16
    BLOCK_N: tl.constexpr,  # key rows per step, power of two >= 16
    INPUT_PRECISION: tl.constexpr,
):
    """Program (m, bh) writes O[b, h, rows, :] and LSE[b, h, rows] for one tile of BLOCK_M query rows.

    Grid axis 0 indexes the query tile (reversed under causal masking: the longest rows start first), axis 1 the
    (batch, head) pair b * H + h.
    """
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _fwd_kernel is not implemented yet (lab07_flash_attention/flash_fwd.py)")


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, offs_m, offs_n, offs_d,
    stride_kn, stride_kd, stride_vn, stride_vd,
    lo, hi, Nk, causal_offset, qk_scale,
    MASKED: tl.constexpr,  # False: every (row, key) pair in [lo, hi) is visible; True: apply bounds and causal masks
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The online-softmax loop over key tiles [lo, hi); returns the updated (acc, l_i, m_i)."""
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: _fwd_inner is not implemented yet (lab07_flash_attention/flash_fwd.py)")
