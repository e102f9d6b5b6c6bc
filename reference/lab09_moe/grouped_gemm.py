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
    # BEGIN SOLUTION
    bounds = offsets.tolist()  # one host sync: the loop needs every slice length
    pieces = [x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])]  # E >= 1 matmuls, empty ones included
    return torch.cat(pieces, dim=0)
    # END SOLUTION


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
    # BEGIN SOLUTION
    check_grouped_inputs(x, w, offsets)
    return GroupedGEMM.apply(x, w, offsets)
    # END SOLUTION


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
    # BEGIN SOLUTION
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    E, C, two_f = w_gate_up.shape
    if two_f % 2 or w_down.shape != (E, two_f // 2, C):
        raise ValueError(f"w_gate_up {tuple(w_gate_up.shape)} must be (E, C, 2F) and w_down {tuple(w_down.shape)} "
                         "(E, F, C)")
    if backend == "torch":
        h = grouped_gemm_torch(x, w_gate_up, offsets)  # (A, 2F)
        gate, up = h.chunk(2, dim=-1)  # (A, F) each, views
        return grouped_gemm_torch(F.silu(gate) * up, w_down, offsets)  # (A, C)
    h = grouped_gemm(x, w_gate_up, offsets)  # (A, 2F); checks the offsets' values (one host sync)
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up  # (A, F)
    check_grouped_inputs(act, w_down, offsets, values=False)  # the same offsets: no second sync
    return GroupedGEMM.apply(act, w_down, offsets)  # (A, C)
    # END SOLUTION


# -----------------------------------------------------------------------------
# Launcher checks and the autograd Function


def check_grouped_inputs(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, values: bool = True) -> None:
    """Raise TypeError/ValueError naming the value and the rule for anything the kernels cannot run.

    values=False skips the check of the offsets' values (the one check that waits for the GPU), for offsets that
    were checked already.
    """
    # BEGIN SOLUTION
    for name, t in (("x", x), ("w", w), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or w.dim() != 3 or offsets.dim() != 1:
        raise ValueError(f"x must be (A, K), w (E, K, N) and offsets (E + 1,); got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(offsets.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must have the same dtype, got {x.dtype} and {w.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype {x.dtype} is not supported: use float16, bfloat16 or float32")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if not (x.device == w.device == offsets.device):
        raise ValueError(f"x, w and offsets must be on one device, got {x.device}, {w.device}, {offsets.device}")
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton "
                             "(common.target.use_target() does it)")
        if x.dtype != torch.float32:
            raise TypeError(f"dtype {x.dtype} needs a CUDA GPU; on CPU (the Triton interpreter) use float32")
    elif x.device.type != "cuda":
        raise ValueError(f"device {x.device} is not supported: use cuda (or cpu through the Triton interpreter)")
    E, K, N = w.shape
    if x.shape[1] != K:
        raise ValueError(f"x has K = {x.shape[1]} columns but w is (E, K, N) = {tuple(w.shape)}")
    if offsets.shape[0] != E + 1:
        raise ValueError(f"offsets must have E + 1 = {E + 1} entries for w {tuple(w.shape)}, got {offsets.shape[0]}")
    if E == 0 or K == 0 or N == 0:
        raise ValueError(f"w {tuple(w.shape)} must have at least one expert and non-empty K and N")
    # one host sync: the kernel trusts these bounds for every load
    if values and bool((offsets[0] != 0) | (offsets[-1] != x.shape[0]) | (offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must start at 0, never decrease, and end at A = {x.shape[0]}; got "
                         f"{offsets.tolist()}")
    # END SOLUTION


class GroupedGEMM(torch.autograd.Function):
    """Y = grouped X @ W; backward dX = grouped dY @ W^T (same kernel), dW[e] = X_e^T dY_e (`_grouped_dw_kernel`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION
        ctx.save_for_backward(x, w, offsets)
        return _launch_grouped(x, w, offsets)
        # END SOLUTION

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        # BEGIN SOLUTION
        x, w, offsets = ctx.saved_tensors
        dx = _launch_grouped(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        dw = _launch_dw(x, dy, offsets, num_experts=w.shape[0]) if ctx.needs_input_grad[1] else None
        return dx, dw, None
        # END SOLUTION


# -----------------------------------------------------------------------------
# Forward (and dX): one launch over every (expert, m-tile, n-tile)


def _launch_grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                    config: GemmConfig | None = None) -> torch.Tensor:
    """Y (A, N) = grouped X (A, K) @ W (E, K, N); inputs already checked."""
    # BEGIN SOLUTION
    config = config or gemm_config(x)
    A, K = x.shape
    E, _, N = w.shape
    y = torch.empty((A, N), dtype=x.dtype, device=x.device)  # A = 0 is fine: every program returns at once
    counts = offsets[1:] - offsets[:-1]
    # running sum of each expert's m-tiles, on the device: no host sync (E + 1,) int32
    tile_offsets = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
    tile_offsets[1:] = torch.cumsum(triton.cdiv(counts, config.block_m), dim=0)
    num_m_tiles = triton.cdiv(A, config.block_m) + E  # the most m-tiles any split of A rows into E slices can need
    grid = (num_m_tiles * triton.cdiv(N, config.block_n),)  # one axis: (m-tile, n-tile) in grouped-M order
    _grouped_gemm_kernel[grid](
        x, w, y, offsets, tile_offsets,
        N, K, E, num_m_tiles,
        *x.stride(), *w.stride(), *y.stride(),  # (A, K), (E, K, N), (A, N)
        EXPERTS_POW2=triton.next_power_of_2(E), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, EVEN_K=K % config.block_k == 0,
        INPUT_PRECISION=_dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
    # END SOLUTION


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
    # BEGIN SOLUTION
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    # grouped-M order: GROUP_M consecutive m-tiles visit n-tile 0, then n-tile 1, ... (W[e]'s strip stays in L2)
    tiles_per_group = GROUP_M * num_n_tiles
    first_m = (pid // tiles_per_group) * GROUP_M
    group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
    m_tile = first_m + (pid % tiles_per_group) % group_size
    n_tile = (pid % tiles_per_group) // group_size

    # the expert of this m-tile: how many experts' tiles end at or before it
    experts = tl.arange(0, EXPERTS_POW2)
    tile_ends = tl.load(TILE_OFFSETS + 1 + experts, mask=experts < num_experts, other=2147483647)
    expert = tl.sum((tile_ends <= m_tile).to(tl.int32), axis=0)
    if expert >= num_experts:
        return  # a surplus program of the upper-bound grid
    row_start = tl.load(OFFSETS + expert) + (m_tile - tl.load(TILE_OFFSETS + expert)) * BLOCK_M
    # rows from this tile's first row to the end of e's slice (the tile holds the first BLOCK_M of them); int32 keeps
    # the offsets below 32-bit even when `offsets` is int64
    num_rows = (tl.load(OFFSETS + expert + 1) - row_start).to(tl.int32)

    # 64-bit scalar bases, 32-bit offsets inside the tile: a tensor of 64-bit offsets costs registers (it spills)
    x_base = X + row_start.to(tl.int64) * stride_xm
    w_base = W + expert.to(tl.int64) * stride_we
    rows = tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # clamp rows and wrap columns so every load is in bounds without a mask; those rows and columns are never stored
    # (with N a multiple of 16, Triton still proves 16 contiguous columns after the % and vectorises the loads)
    rows_in = tl.minimum(rows, num_rows - 1)
    cols_in = cols % N
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_base + (rows_in[:, None] * stride_xm + ks[None, :] * stride_xk)  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_base + (ks[:, None] * stride_wk + cols_in[None, :] * stride_wn)  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            a = tl.load(x_ptrs, mask=ks[None, :] < K - k, other=0.0)
            b = tl.load(w_ptrs, mask=ks[:, None] < K - k, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y_ptrs = Y + row_start.to(tl.int64) * stride_ym + (rows[:, None] * stride_ym + cols[None, :] * stride_yn)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(rows[:, None] < num_rows) & (cols[None, :] < N))
    # END SOLUTION


# -----------------------------------------------------------------------------
# dW: one program per (expert, K-tile, N-tile), reducing over the expert's rows


def _launch_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, *, num_experts: int,
               config: GemmConfig | None = None) -> torch.Tensor:
    """dW (E, K, N) with dW[e] = X[rows of e]^T @ dY[rows of e]; zeros for an expert with no rows."""
    # BEGIN SOLUTION
    config = config or gemm_config(x, weight_grad=True)
    K, N = x.shape[1], dy.shape[1]
    dw = torch.empty((num_experts, K, N), dtype=x.dtype, device=x.device)
    # axis 0: (K-tile, N-tile) in grouped order; axis 1: the expert
    grid = (triton.cdiv(K, config.block_m) * triton.cdiv(N, config.block_n), num_experts)
    _grouped_dw_kernel[grid](
        x, dy, dw, offsets,
        K, N,
        *x.stride(), *dy.stride(), *dw.stride(),  # (A, K), (A, N), (E, K, N)
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        INPUT_PRECISION=_dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dw
    # END SOLUTION


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
    # BEGIN SOLUTION
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_k_tiles = tl.cdiv(K, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n_tiles
    first_k = (pid // tiles_per_group) * GROUP_M
    group_size = tl.minimum(num_k_tiles - first_k, GROUP_M)
    k_tile = first_k + (pid % tiles_per_group) % group_size
    n_tile = (pid % tiles_per_group) // group_size

    row_start = tl.load(OFFSETS + expert)
    num_rows = (tl.load(OFFSETS + expert + 1) - row_start).to(tl.int32)  # int32: 32-bit offsets below
    num_full = num_rows // BLOCK_K * BLOCK_K  # rows [0, num_full) of the slice: whole steps, no mask needed
    offs_k = k_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k_in = offs_k % K  # wrapped into bounds: only the tile's entries < K, < N are stored
    offs_n_in = offs_n % N
    steps = tl.arange(0, BLOCK_K)
    # 64-bit scalar bases at the slice's first row, 32-bit offsets inside the tile (fewer registers)
    x_ptrs = X + row_start.to(tl.int64) * stride_xm + (steps[:, None] * stride_xm + offs_k_in[None, :] * stride_xk)
    dy_ptrs = DY + row_start.to(tl.int64) * stride_dym + (steps[:, None] * stride_dym + offs_n_in[None, :] * stride_dyn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # fp32 accumulation
    for _ in range(0, num_full, BLOCK_K):
        a = tl.load(x_ptrs)  # (BLOCK_K, BLOCK_M): rows x K-columns
        b = tl.load(dy_ptrs)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xm
        dy_ptrs += BLOCK_K * stride_dym
    if num_full < num_rows:  # the ragged last step: rows past the slice read zeros
        inside = (num_full + steps)[:, None] < num_rows
        a = tl.load(x_ptrs, mask=inside, other=0.0)
        b = tl.load(dy_ptrs, mask=inside, other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)

    dw_ptrs = DW + expert.to(tl.int64) * stride_we + (offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn)
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))
    # END SOLUTION


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full precision ("ieee"), not TF32, so they match a float64 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"
