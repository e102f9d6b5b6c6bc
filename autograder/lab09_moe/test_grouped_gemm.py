"""Lab 09, part 3: the Triton grouped GEMM (grouped_gemm.py): forward, dX, dW, one launch each, the SwiGLU experts.

Without a GPU the kernels run in the Triton interpreter (fp32, tiny shapes; the interpreter's tiles are 16 x 32 with
K steps of 32, so these slices leave ragged tiles). Expected values are float64 per-expert matmuls computed here.
Tolerance: fp32 rounding of sums of up to 64 products of unit-size values (atol 1e-5).
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

ATOL = 1e-5


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _offsets(counts: list[int]) -> torch.Tensor:
    """(E + 1,) int64: 0, then the running sum of the counts."""
    return torch.tensor([0] + [sum(counts[:e + 1]) for e in range(len(counts))], dtype=torch.int64)


def _operands(counts: list[int], K: int, N: int, seed: int, *, transposed_w: bool = False,
              strided_x: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (A, K), w (E, K, N) (a transposed view when asked), offsets (E + 1,), fp32."""
    A, E = sum(counts), len(counts)
    x = random_tensor(K, A, seed=seed).t() if strided_x else random_tensor(A, K, seed=seed)
    w = random_tensor(E, N, K, seed=seed + 1).transpose(1, 2) if transposed_w else random_tensor(E, K, N, seed=seed + 1)
    return x, w, _offsets(counts)


# -----------------------------------------------------------------------------
# Producers: run in the worker


def gemm_of(counts: list[int], K: int, N: int, seed: int, backend: str, device: str, transposed_w: bool = False,
            strided_x: bool = False) -> dict:
    from lab09_moe.grouped_gemm import grouped_gemm, grouped_gemm_torch

    x, w, offsets = _operands(counts, K, N, seed, transposed_w=transposed_w, strided_x=strided_x)
    x, w = x.to(device).requires_grad_(True), w.to(device).requires_grad_(True)
    y = (grouped_gemm if backend == "triton" else grouped_gemm_torch)(x, w, offsets.to(device))
    probe = random_tensor(*y.shape, seed=seed + 2).to(device)
    (y * probe).sum().backward()
    return {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": w.grad.cpu()}


class _Counted:
    """Stands in for a @triton.jit kernel: counts `kernel[grid](...)` launches, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def launches_of(counts: list[int], K: int, N: int, device: str, x_grad: bool = True, w_grad: bool = True) -> dict:
    """Kernel launches during one forward and one backward of grouped_gemm (x and w requiring grad as asked)."""
    from lab09_moe import grouped_gemm as module

    x, w, offsets = _operands(counts, K, N, seed=7)
    x, w = x.to(device).requires_grad_(x_grad), w.to(device).requires_grad_(w_grad)
    saved = module._grouped_gemm_kernel, module._grouped_dw_kernel
    module._grouped_gemm_kernel, module._grouped_dw_kernel = _Counted(saved[0]), _Counted(saved[1])
    try:
        y = module.grouped_gemm(x, w, offsets.to(device))
        forward = (module._grouped_gemm_kernel.launches, module._grouped_dw_kernel.launches)
        y.sum().backward()
        total = (module._grouped_gemm_kernel.launches, module._grouped_dw_kernel.launches)
    finally:
        module._grouped_gemm_kernel, module._grouped_dw_kernel = saved
    return {"forward": forward, "total": total}


def mlp_of(counts: list[int], C: int, F: int, seed: int, backend: str, device: str) -> dict:
    from lab09_moe.grouped_gemm import expert_mlp

    E = len(counts)
    x = random_tensor(sum(counts), C, seed=seed).to(device).requires_grad_(True)
    w_gate_up = (random_tensor(E, C, 2 * F, seed=seed + 1) * 0.5).to(device).requires_grad_(True)
    w_down = (random_tensor(E, F, C, seed=seed + 2) * 0.5).to(device).requires_grad_(True)
    y = expert_mlp(x, _offsets(counts).to(device), w_gate_up, w_down, backend=backend)
    probe = random_tensor(*y.shape, seed=seed + 3).to(device)
    (y * probe).sum().backward()
    return {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw_gate_up": w_gate_up.grad.cpu(),
            "dw_down": w_down.grad.cpu()}


def raise_for(case: str, device: str) -> None:
    from lab09_moe.grouped_gemm import expert_mlp, grouped_gemm

    x, w, offsets = _operands([3, 2], 16, 16, seed=1)
    x, w, offsets = x.to(device), w.to(device), offsets.to(device)
    if case == "dtype_mismatch":
        grouped_gemm(x, w.double(), offsets)
    elif case == "unsupported_dtype":
        grouped_gemm(x.double(), w.double(), offsets)
    elif case == "float_offsets":
        grouped_gemm(x, w, offsets.float())
    elif case == "offsets_end":
        grouped_gemm(x, w, torch.tensor([0, 3, 4], device=device))
    elif case == "offsets_decrease":
        grouped_gemm(x, w, torch.tensor([0, 6, 5], device=device))  # ends at A = 5, but expert 1 would have -1 rows
    elif case == "offsets_length":
        grouped_gemm(x, w, offsets[:2])
    elif case == "k_mismatch":
        grouped_gemm(x[:, :8], w, offsets)
    elif case == "x_not_2d":
        grouped_gemm(x[None], w, offsets)
    elif case == "offsets_start":
        grouped_gemm(x, w, torch.tensor([1, 3, 5], device=device))
    elif case == "empty_n":
        grouped_gemm(x, w[:, :, :0], offsets)
    elif case == "mlp_down_dtype":
        expert_mlp(x, offsets, torch.zeros(2, 16, 8, device=device), torch.zeros(2, 4, 16, device=device).double(),
                   backend="triton")
    elif case == "mlp_odd_gate_up":
        expert_mlp(x, offsets, torch.zeros(2, 16, 9, device=device), torch.zeros(2, 4, 16, device=device),
                   backend="torch")
    elif case == "empty_k":
        grouped_gemm(x[:, :0], w[:, :0], offsets)
    elif case == "no_experts":
        grouped_gemm(x, w[:0], offsets[:1])
    elif case == "backend":
        expert_mlp(x, offsets, torch.zeros(2, 16, 8, device=device), torch.zeros(2, 4, 16, device=device),
                   backend="cuda")
    elif case == "mlp_shapes":
        expert_mlp(x, offsets, torch.zeros(2, 16, 8, device=device), torch.zeros(2, 3, 16, device=device),
                   backend="torch")


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _expected_gemm(counts, K, N, seed, **layout):
    """Per-expert float64 matmuls and their gradients for the probe of `gemm_of`."""
    x, w, offsets = _operands(counts, K, N, seed, **layout)
    x, w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    bounds = offsets.tolist()
    rows = [x[bounds[e]:bounds[e + 1]].matmul(w[e]) for e in range(len(counts))]
    y = torch.cat(rows) if rows else torch.zeros(0, N, dtype=torch.float64)
    (y * random_tensor(*y.shape, seed=seed + 2).double()).sum().backward()
    return y.detach(), x.grad, w.grad


def _check_gemm(got, counts, K, N, seed, what, **layout):
    y, dx, dw = _expected_gemm(counts, K, N, seed, **layout)
    inputs = describe(counts=counts, K=K, N=N, **layout)
    check_close(got["y"], y, name=f"{what} (Y)", inputs=inputs, atol=ATOL)
    check_close(got["dx"], dx, name=f"{what} (dX)", inputs=inputs, atol=ATOL)
    check_close(got["dw"], dw, name=f"{what} (dW, zero for an expert without rows)", inputs=inputs, atol=ATOL)


CASES = [([5, 0, 37, 1], 40, 48), ([0, 32, 16], 64, 64), ([3, 0, 0], 32, 16), ([2, 0, 0, 7, 0, 1, 0, 0, 19], 16, 40)]


@pytest.mark.points(2)
@pytest.mark.parametrize("counts,K,N", CASES[:2])
def test_torch_loop_matches_float64(student, counts, K, N):
    """grouped_gemm_torch, the per-expert loop: Y and the gradients, empty experts included."""
    got = student.run(gemm_of, counts, K, N, 3, "torch", "cpu")
    _check_gemm(got, counts, K, N, 3, "grouped_gemm_torch")


@pytest.mark.points(8)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("counts,K,N", CASES)
def test_grouped_gemm_forward_and_backward(student, counts, K, N):
    """The Triton grouped GEMM: Y, dX and dW against float64 per-expert matmuls. Ragged slices (5, 37, 1, 19 rows),
    empty experts first, in the middle and last, K and N that are not multiples of the tile, E = 9 (not a power of
    two)."""
    got = student.run(gemm_of, counts, K, N, 11, "triton", _device())
    _check_gemm(got, counts, K, N, 11, "grouped_gemm")


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_grouped_gemm_takes_strided_operands(student):
    """A transposed weight view (E, K, N) with strides (N K, 1, K), as the backward's dX uses, and a transposed x."""
    counts, K, N = [6, 11, 0, 4], 24, 40
    got = student.run(gemm_of, counts, K, N, 5, "triton", _device(), transposed_w=True, strided_x=True)
    _check_gemm(got, counts, K, N, 5, "grouped_gemm on strided views", transposed_w=True, strided_x=True)


@pytest.mark.points(2)
def test_grouped_gemm_with_no_rows(student):
    """A = 0 (every expert empty): Y is (0, N), dX is (0, K), dW is all zeros."""
    got = student.run(gemm_of, [0, 0], 16, 8, 2, "triton", _device())
    assert got["y"].shape == (0, 8) and got["dx"].shape == (0, 16), (
        f"grouped_gemm with no rows returned Y {tuple(got['y'].shape)}, dX {tuple(got['dx'].shape)}")
    assert got["dw"].shape == (2, 16, 8) and not got["dw"].abs().sum(), "grouped_gemm with no rows: dW must be 0"


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_one_launch_each(student):
    """Forward: one launch of _grouped_gemm_kernel for all experts; backward: one more (dX) and one
    _grouped_dw_kernel (dW), each only when that gradient is needed."""
    got = student.run(launches_of, [4, 0, 9, 3, 20], 32, 32, _device())
    assert tuple(got["forward"]) == (1, 0), (
        f"grouped_gemm forward launched _grouped_gemm_kernel {got['forward'][0]} times and _grouped_dw_kernel "
        f"{got['forward'][1]} times for 5 experts; expected one launch of the first, none of the second")
    assert tuple(got["total"]) == (2, 1), (
        f"forward + backward launched _grouped_gemm_kernel {got['total'][0]} and _grouped_dw_kernel "
        f"{got['total'][1]} times; expected 2 (Y, dX) and 1 (dW)")
    for x_grad, w_grad, want in ((True, False, (2, 0)), (False, True, (1, 1))):
        got = student.run(launches_of, [4, 0, 9], 16, 16, _device(), x_grad, w_grad)
        assert tuple(got["total"]) == want, (
            f"grouped_gemm with x.requires_grad={x_grad}, w.requires_grad={w_grad}: forward + backward launched "
            f"_grouped_gemm_kernel {got['total'][0]} and _grouped_dw_kernel {got['total'][1]} times, expected "
            f"{want} (compute only the gradients autograd asks for: ctx.needs_input_grad)")


def _expected_mlp(counts, C, F, seed):
    from autograder.lab09_moe.expected import swiglu_expert

    E = len(counts)
    x = random_tensor(sum(counts), C, seed=seed).double().requires_grad_(True)
    w_gate_up = (random_tensor(E, C, 2 * F, seed=seed + 1) * 0.5).double().requires_grad_(True)
    w_down = (random_tensor(E, F, C, seed=seed + 2) * 0.5).double().requires_grad_(True)
    bounds = _offsets(counts).tolist()
    y = torch.cat([swiglu_expert(x[bounds[e]:bounds[e + 1]], w_gate_up[e], w_down[e]) for e in range(E)])
    (y * random_tensor(*y.shape, seed=seed + 3).double()).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw_gate_up": w_gate_up.grad, "dw_down": w_down.grad}


@pytest.mark.points(4)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_mlp_is_swiglu_per_expert(student, backend):
    """(silu(X W_gate) * (X W_up)) W_down on each expert's rows, W_gate | W_up side by side in w_gate_up; and its
    gradients."""
    counts, C, F = [4, 0, 9], 16, 24
    got = student.run(mlp_of, counts, C, F, 13, backend, _device() if backend == "triton" else "cpu")
    want = _expected_mlp(counts, C, F, 13)
    for key, value in want.items():
        check_close(got[key], value, name=f"expert_mlp(backend={backend!r}) ({key})",
                    inputs=describe(counts=counts, C=C, F=F), atol=ATOL)


@pytest.mark.points(3)
@pytest.mark.parametrize("case,error,match", [
    ("dtype_mismatch", TypeError, "same dtype"), ("unsupported_dtype", TypeError, "float64"),
    ("float_offsets", TypeError, "offsets"), ("offsets_end", ValueError, "offsets"),
    ("offsets_decrease", ValueError, "offsets"), ("offsets_length", ValueError, r"E \+ 1 = 3 entries .*got 2"),
    ("offsets_start", ValueError, "start at 0"), ("k_mismatch", ValueError, "K = 8"),
    ("x_not_2d", ValueError, r"\(A, K\)"), ("empty_k", ValueError, "non-empty"), ("empty_n", ValueError, "non-empty"),
    ("no_experts", ValueError, "expert"), ("backend", ValueError, "backend"), ("mlp_shapes", ValueError, "w_down"),
    ("mlp_odd_gate_up", ValueError, "w_gate_up"), ("mlp_down_dtype", TypeError, "same dtype")])
def test_bad_input_is_refused(student, case, error, match):
    """Mismatched or unsupported dtypes (TypeError), in expert_mlp's second GEMM too; x not 2-D, offsets that do not
    start at 0, decrease, miss the end or have the wrong length, a K that does not match, an empty K or N, no
    expert, an unknown backend, expert weights whose shapes disagree or an odd 2F (ValueError)."""
    with pytest.raises(error, match=match):
        student.run(raise_for, case, _device())
