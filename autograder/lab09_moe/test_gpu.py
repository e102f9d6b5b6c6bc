"""Lab 09 on a GPU: the grouped GEMM and the MoE layer in bf16 at realistic shapes, and expert parallelism on NCCL.

These need CUDA and are reported "not graded here" on a machine without one. Accuracy criterion: against an fp32
computation from the same bf16 inputs, our max abs error is at most twice that of the peer a user would call
(torch._grouped_mm; cuBLAS per expert when it is missing), plus 1e-3. The distributed test is graded where each rank
has its own GPU (NCCL).
"""

import pytest
import torch

from common.testing import describe

COUNTS = [700, 0, 1333, 64, 1, 0, 2047, 513]  # ragged, empty experts, one row, a multiple of 64


def _inputs(counts, K, N, *, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    A, E = sum(counts), len(counts)
    x = torch.randn(A, K, device="cuda", generator=generator).to(torch.bfloat16)
    w = (torch.randn(E, K, N, device="cuda", generator=generator) * K ** -0.5).to(torch.bfloat16)
    dy = torch.randn(A, N, device="cuda", generator=generator).to(torch.bfloat16)
    offsets = torch.tensor([0] + [sum(counts[:e + 1]) for e in range(E)], device="cuda")
    return x, w, dy, offsets


def _forward_backward(gemm, x, w, dy, offsets):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w)]
    y = gemm(*leaves, offsets)
    y.backward(dy.to(y.dtype))
    return [y.detach().float(), leaves[0].grad.float(), leaves[1].grad.float()]


def _loop(x, w, offsets):
    bounds = offsets.tolist()
    return torch.cat([x[bounds[e]:bounds[e + 1]] @ w[e] for e in range(w.shape[0])])


def _peer(x, w, dy, offsets):
    """torch._grouped_mm's Y, dX, dW in bf16 (cuBLAS per expert where _grouped_mm or its backward is missing)."""
    if hasattr(torch, "_grouped_mm"):
        try:
            return _forward_backward(lambda a, b, o: torch._grouped_mm(a, b, offs=o[1:].to(torch.int32)), x, w, dy,
                                     offsets)
        except RuntimeError:
            pass
    return _forward_backward(_loop, x, w, dy, offsets)


# -----------------------------------------------------------------------------
# Producers: run in the worker


def bf16_grouped_gemm(counts: list[int], K: int, N: int, transposed: bool, seed: int) -> dict:
    from lab09_moe.grouped_gemm import grouped_gemm

    x, w, dy, offsets = _inputs(counts, K, N, seed=seed)
    if transposed:  # the same values stored (E, N, K), passed as a transposed view
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    y, dx, dw = _forward_backward(grouped_gemm, x, w, dy, offsets)
    return {"y": y.cpu(), "dx": dx.cpu(), "dw": dw.cpu()}


def bf16_layer(seed: int) -> dict:
    """MoELayer bf16 on the Triton backend and the same weights on the torch backend."""
    from lab09_moe.moe_layer import MoEConfig, MoELayer

    torch.manual_seed(seed)
    config = MoEConfig(num_experts=16, top_k=4, ffn_width=384, backend="triton")
    layer = MoELayer(512, config).cuda().to(torch.bfloat16)
    x = torch.randn(4, 512, 512, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    y.float().pow(2).mean().backward()
    grads = {name: p.grad.float().cpu() for name, p in layer.named_parameters()}
    state = {name: p.detach().float().cpu() for name, p in layer.state_dict().items()}
    return {"y": y.float().cpu(), "x": x.float().cpu(), "grads": grads, "state": state}


# -----------------------------------------------------------------------------
# Tests: run in the grader (on a GPU machine)


@pytest.mark.gpu
@pytest.mark.points(3)
@pytest.mark.time_limit(180)
@pytest.mark.parametrize("K,N,transposed", [(1024, 1536, False), (768, 520, True)])
def test_bf16_grouped_gemm_matches_fp32(student, K, N, transposed):
    """bf16, ~6700 rows over 8 experts (two empty, one with a single row), Y, dX and dW as accurate as the peer's;
    a K-major weight view and an N that is not a multiple of the tile."""
    x, w, dy, offsets = _inputs(COUNTS, K, N, seed=K)
    got = student.run(bf16_grouped_gemm, COUNTS, K, N, transposed, K)
    ref = _forward_backward(_loop, x.float(), w.float(), dy.float(), offsets)
    peer = _peer(x, w, dy, offsets)
    for index, name in enumerate(("y", "dx", "dw")):
        error = (got[name].cuda() - ref[index]).abs().max().item()
        peer_error = (peer[index] - ref[index]).abs().max().item()
        assert error <= 2 * peer_error + 1e-3, (
            f"grouped_gemm ({name}) on {describe(counts=COUNTS, K=K, N=N, transposed=transposed)} bf16: max abs "
            f"error {error:.3g} against fp32, more than 2x the peer's {peer_error:.3g} + 1e-3")


def _layer_by_hand(state: dict, x: torch.Tensor, dtype: torch.dtype) -> dict:
    """The top-4 MoE layer written out with torch ops in `dtype` (softmax in fp32): output and gradients of
    mean(y^2). The router logits are computed in bf16 as the layer computes them (the same cuBLAS call), so every
    variant picks the same experts even where two probabilities nearly tie."""
    weights = {name: value.detach().cuda().to(dtype).requires_grad_(True) for name, value in state.items()}
    x = x.cuda().reshape(-1, 512).to(dtype)
    with torch.no_grad():  # values only: the gradient comes through `logits` below
        exact = torch.nn.functional.linear(x.to(torch.bfloat16), weights["router.weight"].to(torch.bfloat16)).float()
    logits = torch.nn.functional.linear(x, weights["router.weight"]).float()  # nn.Linear's op, in `dtype`
    logits = exact + (logits - logits.detach())  # the bf16 values, the gradient of the dtype's own op
    probs = torch.softmax(logits, dim=-1)
    top, experts = probs.topk(4, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(16):
        rows, slots = (experts == e).nonzero(as_tuple=True)
        if rows.numel():
            gate, up = (x[rows] @ weights["w_gate_up"][e]).chunk(2, dim=-1)
            out = (torch.nn.functional.silu(gate) * up) @ weights["w_down"][e]
            y = y.index_add(0, rows, out.float() * top[rows, slots, None])
    y = y.to(dtype)
    y.float().pow(2).mean().backward()
    return {"y": y.detach().float(), **{name: value.grad.float() for name, value in weights.items()}}


@pytest.mark.gpu
@pytest.mark.points(2)
@pytest.mark.time_limit(180)
def test_bf16_moe_layer_on_the_grouped_gemm(student):
    """A bf16 MoELayer (E16 top-4, C 512, F 384, 2048 tokens) on the Triton backend: output and gradients against
    the same layer in fp32 (same routing decisions), at most 2x the error of the layer written out in bf16 torch ops
    (plus 1e-3 of the largest value)."""
    got = student.run(bf16_layer, 3)
    ref = _layer_by_hand(got["state"], got["x"], torch.float32)
    peer = _layer_by_hand(got["state"], got["x"], torch.bfloat16)
    ours = {"y": got["y"].reshape(-1, 512).cuda(), **{name: g.cuda() for name, g in got["grads"].items()}}
    for name, want in ref.items():
        error = (ours[name] - want).abs().max().item()
        peer_error = (peer[name] - want).abs().max().item()
        scale = want.abs().max().item()
        assert error <= 2 * peer_error + 1e-3 * scale, (
            f"MoELayer bf16 on the Triton backend ({name}), x (4, 512, 512), E16 top-4 F384: max abs error "
            f"{error:.3g} against fp32, more than 2x the bf16 torch version's {peer_error:.3g} + 1e-3 * {scale:.3g}")


@pytest.mark.gpus(2)
@pytest.mark.points(2)
@pytest.mark.time_limit(240)
def test_expert_parallel_on_nccl(student):
    """The world-size-2 expert-parallel check of test_expert_parallel.py on NCCL (a GPU per rank), float64."""
    from autograder.lab09_moe.expected import moe_weights
    from autograder.lab09_moe.test_expert_parallel import EXPERTS, FFN, WIDTH, _check_layer, ep_layer
    from common.testing import random_tensor

    weights = moe_weights(num_experts=EXPERTS, width=WIDTH, ffn_width=FFN, seed=2)
    xs = [random_tensor(n, WIDTH, dtype=torch.float64, seed=20 + r) for r, n in enumerate([7, 3])]
    config = dict(num_experts=EXPERTS, top_k=2, ffn_width=FFN, backend="torch")
    results = student.run(ep_layer, weights, config, xs, 40, 2, 3)
    _check_layer(results, weights, xs, 40, what="ExpertParallelMoE on NCCL", routing=dict(top_k=2))
