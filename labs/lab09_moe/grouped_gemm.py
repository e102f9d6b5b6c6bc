"""A grouped GEMM in Triton: every expert's token slice times its own weight, in one kernel launch.

What it saves: launches and idle SMs. After dispatch (dispatch.py), expert e owns rows offsets[e]:offsets[e+1] of the
sorted tokens X (A, K), and its weight is W[e] (K, N). A loop of E matmuls launches E kernels, each too small to fill
the GPU when E is large and the slices are short (64 experts of ~1500 rows: each matmul leaves most SMs idle, and the
loop waits on the host for every slice length). One grouped GEMM schedules all the output tiles of all the experts in
one grid:

    Y[offsets[e]:offsets[e+1]] = X[offsets[e]:offsets[e+1]] @ W[e]          for every e, in one launch

Tiles are scheduled over (expert, m-tile, n-tile). Expert e has ceil(counts_e / BLOCK_M) m-tiles; their running sum
`tile_offsets` (E + 1,) is computed on the device, so nothing waits on the host. Program p finds its m-tile and
n-tile (grouped-M order: GROUP_M m-tiles share each n-tile sweep, so a strip of W stays in L2), then its expert e as
the number of tile_offsets[1:] <= m-tile. An expert with no tokens has no tiles; the grid is sized for the worst case
(ceil(A / BLOCK_M) + E m-tiles) and the surplus programs return at once. This is the scheduling of Megablocks'
grouped GEMM and of torch._grouped_mm (Gale et al. 2022, arXiv:2211.15841; Triton's grouped GEMM tutorial).

Backward, for L(Y):

    dX[rows of e] = dY[rows of e] @ W[e]^T      the same kernel, on W transposed (a stride swap, no copy)
    dW[e]         = X[rows of e]^T @ dY[rows of e]     a second kernel: one program per (expert, K-tile, N-tile)
                                                      reduces over the expert's rows; an empty expert gets dW = 0

The expert MLP is SwiGLU (Shazeer 2020, arXiv:2002.05202), as in Mixtral: two grouped GEMMs around an elementwise
gate, with W_gate and W_up side by side in one (E, C, 2F) weight so the first GEMM reads X once:

    H = X @ W_gate_up[e]          (A, 2F)          y = (silu(H[:, :F]) * H[:, F:]) @ W_down[e]       (A, C)

Usage:
    y = grouped_gemm(x_sorted, w, plan.offsets)                 # x (A, K), w (E, K, N), offsets (E + 1,)
    y = expert_mlp(x_sorted, plan.offsets, w_gate_up, w_down)   # the SwiGLU experts
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True, kw_only=True)
class GemmConfig:
    """Tile sizes and launch parameters of one kernel (fixed per device; no autotuning).

    block_m, block_n: the output tile (powers of two, >= 16 for tl.dot).
    block_k: the reduction step (power of two, >= 16).
    group_m: m-tiles that sweep the n-tiles together (L2 reuse); 1 is plain row-major order.
    num_warps, num_stages: warps per program and the software-pipelining depth of the loads.
    """

    block_m: int = 32
    block_n: int = 32
    block_k: int = 32
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemmConfig.{name} ({value}) must be a power of two >= 16 (tl.dot needs it)")
        if self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"GemmConfig.group_m ({self.group_m}) and num_stages ({self.num_stages}) must be >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig.num_warps ({self.num_warps}) must be 1, 2, 4, 8 or 16")


def gemm_config(x: torch.Tensor, *, weight_grad: bool = False) -> GemmConfig:
    """Block sizes per device and dtype. Fixed and commented, never autotuned (the course's rule).

    `weight_grad` picks the dW kernel's tiles: (block_m, block_n) tile dW[e] (K, N) and block_k steps over rows.
    """
    if x.device.type != "cuda":
        # the interpreter runs each tile op in numpy: few mid-sized tiles are fastest, and 16 rows still leave
        # ragged tails in the tests' slices; groups of 3 m-tiles leave partial groups at the end of the grid
        return GemmConfig(block_m=16, block_n=32, block_k=32, group_m=3, num_warps=1, num_stages=1)
    if x.dtype == torch.float32:
        # fp32 is for checking correctness on a GPU: 4-byte tiles need small blocks to fit in shared memory
        return GemmConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=2)
    # Hopper (H100/H200), bf16/fp16: a 128 x 256 output tile over 8 warps (two warpgroups of wgmma), K steps of 64,
    # a 3-deep load pipeline (3 * (128 + 256) * 64 * 2 bytes = 147 KiB of shared memory); the largest tile Triton's
    # matmul tutorial runs on Hopper. group_m = 8 keeps a strip of W[e] (64 x 256 x 8 tiles) hot in L2.
    # benchmark.py --sweep times the alternatives.
    return GemmConfig(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3)


# -----------------------------------------------------------------------------
# The plain-PyTorch version (the per-expert loop a grouped GEMM replaces)


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Y[offsets[e]:offsets[e+1]] = X[offsets[e]:offsets[e+1]] @ W[e], one matmul per expert (autograd built in).

    Args:
        x: (A, K) rows grouped by expert.
        w: (E, K, N).
        offsets: (E + 1,) integer, offsets[0] = 0, non-decreasing, offsets[E] = A.

    Returns:
        (A, N) in x's dtype.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: grouped_gemm_torch is not implemented yet (lab09_moe/grouped_gemm.py)")


# -----------------------------------------------------------------------------
# Public entry points


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The grouped GEMM with autograd: forward and dX through `_grouped_gemm_kernel`, dW through `_grouped_dw_kernel`.

    Args:
        x: (A, K) fp16/bf16/fp32 on CUDA, fp32 on CPU (the Triton interpreter); rows grouped by expert. Any strides.
        w: (E, K, N), same dtype and device. Any strides (a transposed view is fine).
        offsets: (E + 1,) int32/int64 on x's device, offsets[0] = 0, non-decreasing, offsets[E] = A.

    Returns:
        (A, N) in x's dtype, contiguous.

    Raises:
        TypeError: unsupported or mismatched dtypes, or non-integer offsets.
        ValueError: shapes, devices or offsets the kernel cannot run.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: grouped_gemm is not implemented yet (lab09_moe/grouped_gemm.py)")


def expert_mlp(x: torch.Tensor, offsets: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, *,
               backend: str = "triton") -> torch.Tensor:
    """The SwiGLU experts on expert-sorted rows: (silu(X W_gate) * (X W_up)) W_down, per expert.

    Args:
        x: (A, C) rows grouped by expert.
        offsets: (E + 1,) slice boundaries (dispatch.py).
        w_gate_up: (E, C, 2F): columns [0, F) are W_gate, [F, 2F) are W_up.
        w_down: (E, F, C).
        backend: "triton" (grouped_gemm) or "torch" (grouped_gemm_torch, the per-expert loop).

    Returns:
        (A, C) in x's dtype.

    Raises:
        ValueError: an unknown backend, or weights whose shapes disagree.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: expert_mlp is not implemented yet (lab09_moe/grouped_gemm.py)")


# -----------------------------------------------------------------------------
# Launcher checks and the autograd Function


def check_grouped_inputs(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, values: bool = True) -> None:
    """Raise TypeError/ValueError naming the value and the rule for anything the kernels cannot run.

    values=False skips the check of the offsets' values (the one check that waits for the GPU), for offsets that
    were checked already.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: check_grouped_inputs is not implemented yet (lab09_moe/grouped_gemm.py)")


class GroupedGEMM(torch.autograd.Function):
    """Y = grouped X @ W; backward dX = grouped dY @ W^T (same kernel), dW[e] = X_e^T dY_e (`_grouped_dw_kernel`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: GroupedGEMM.forward is not implemented yet (lab09_moe/grouped_gemm.py)")

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        # TODO (lab09): your code here
        raise NotImplementedError("lab09: GroupedGEMM.backward is not implemented yet (lab09_moe/grouped_gemm.py)")


# -----------------------------------------------------------------------------
# Forward (and dX): one launch over every (expert, m-tile, n-tile)


def _launch_grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                    config: GemmConfig | None = None) -> torch.Tensor:
    """Y (A, N) = grouped X (A, K) @ W (E, K, N); inputs already checked."""
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: _launch_grouped is not implemented yet (lab09_moe/grouped_gemm.py)")


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    X, W, Y, OFFSETS, TILE_OFFSETS,
    # sizes
    N, K, num_experts, num_m_tiles,
    # strides (elements)
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    # meta-parameters
    EXPERTS_POW2: tl.constexpr,  # next power of two >= E, for the vector of tile offsets
    BLOCK_M: tl.constexpr,  # rows per tile, power of two >= 16
    BLOCK_N: tl.constexpr,  # columns per tile, power of two >= 16
    BLOCK_K: tl.constexpr,  # reduction step, power of two >= 16
    GROUP_M: tl.constexpr,  # m-tiles per group in the launch order
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the K loop
    INPUT_PRECISION: tl.constexpr,
):
    """Program p writes one (BLOCK_M, BLOCK_N) tile Y[rows, cols] of one expert e: rows inside e's slice.

    Grid axis 0 enumerates (m-tile, n-tile) pairs in grouped-M order over an upper bound of m-tiles; m-tile i belongs
    to the expert e with tile_offsets[e] <= i < tile_offsets[e + 1], and covers rows offsets[e] + (i -
    tile_offsets[e]) * BLOCK_M onwards, clipped at offsets[e + 1]. Programs past the last real m-tile return.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: _grouped_gemm_kernel is not implemented yet (lab09_moe/grouped_gemm.py)")


# -----------------------------------------------------------------------------
# dW: one program per (expert, K-tile, N-tile), reducing over the expert's rows


def _launch_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, *, num_experts: int,
               config: GemmConfig | None = None) -> torch.Tensor:
    """dW (E, K, N) with dW[e] = X[rows of e]^T @ dY[rows of e]; zeros for an expert with no rows."""
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: _launch_dw is not implemented yet (lab09_moe/grouped_gemm.py)")


@triton.jit
def _grouped_dw_kernel(
    # pointers
    X, DY, DW, OFFSETS,
    # sizes
    K, N,
    # strides (elements)
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
    # meta-parameters
    BLOCK_M: tl.constexpr,  # rows of the dW tile (along K), power of two >= 16
    BLOCK_N: tl.constexpr,  # columns of the dW tile (along N), power of two >= 16
    BLOCK_K: tl.constexpr,  # token rows per reduction step, power of two >= 16
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Program (p, e) writes one (BLOCK_M, BLOCK_N) tile of dW[e] = X_e^T dY_e, summing over e's rows.

    Grid axis 0 enumerates the (K-tile, N-tile) pairs of dW[e] in grouped order, axis 1 is the expert e. The full
    BLOCK_K-row steps run unmasked; the ragged last step is masked. No rows: the tile is written as zeros.
    """
    # TODO (lab09): your code here
    raise NotImplementedError("lab09: _grouped_dw_kernel is not implemented yet (lab09_moe/grouped_gemm.py)")


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full precision ("ieee"), not TF32, so they match a float64 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"
