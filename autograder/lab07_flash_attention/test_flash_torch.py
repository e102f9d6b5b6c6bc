"""Lab 07, part 1: FlashAttention-2 in plain PyTorch, tiled with the online softmax (flash_torch.py).

Producers run the student's functions in the grading worker (CPU, float64 or float32 inputs); the tests compare with
textbook attention in float64 (conftest.py), computed here.
"""

import pytest
import torch

from common.testing import check_close, describe

CASES = [
    # B, H, H_kv, Nq, Nk, D, causal, block_m, block_n
    (2, 2, 2, 37, 37, 16, False, 16, 16),
    (1, 4, 2, 45, 45, 16, True, 16, 8),
    (1, 2, 1, 19, 50, 32, True, 8, 16),  # Nq < Nk: the mask is aligned bottom-right
]

# Causal offsets Nk - Nq covering every residue modulo the 8-row tiles twice (Nq ragged, 13, and whole tiles, 16),
# and rows that see no key at all: a tile skipped one step too early or too late only shows when a row's last visible
# key starts a tile
SWEEP_OFFSETS = list(range(-8, 9)) + [-11, -12]

# -----------------------------------------------------------------------------
# Producers: run in the worker


def torch_forward(q, k, v, *, causal: bool, block_m: int, block_n: int, sm_scale: float | None = None) -> dict:
    from lab07_flash_attention.flash_torch import flash_attention_torch

    o, lse = flash_attention_torch(q, k, v, causal=causal, sm_scale=sm_scale, block_m=block_m, block_n=block_n)
    return {"o": o, "lse": lse}


def torch_backward(q, k, v, o, lse, do, *, causal: bool, block_m: int, block_n: int,
                   sm_scale: float | None = None) -> dict:
    from lab07_flash_attention.flash_torch import flash_attention_backward_torch

    dq, dk, dv = flash_attention_backward_torch(q, k, v, o, lse, do, causal=causal, sm_scale=sm_scale,
                                                block_m=block_m, block_n=block_n)
    return {"dq": dq, "dk": dk, "dv": dv}


def torch_sweep(cases: list[dict], *, block_m: int, block_n: int) -> list[dict]:
    """Forward and backward (given the float64 O and L in each case) of many small causal cases in one call."""
    from lab07_flash_attention.flash_torch import flash_attention_backward_torch, flash_attention_torch

    results = []
    for case in cases:
        q, k, v = case["q"], case["k"], case["v"]
        o, lse = flash_attention_torch(q, k, v, causal=True, block_m=block_m, block_n=block_n)
        dq, dk, dv = flash_attention_backward_torch(q, k, v, case["o"], case["lse"], case["do"], causal=True,
                                                    block_m=block_m, block_n=block_n)
        results.append({"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv})
    return results


def torch_forward_error(H: int, H_kv: int) -> None:
    from lab07_flash_attention.flash_torch import flash_attention_torch

    q = torch.ones(1, H, 4, 8, dtype=torch.float64)
    k = torch.ones(1, H_kv, 4, 8, dtype=torch.float64)
    flash_attention_torch(q, k, k)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _check_grads(got: dict, expected, *, what: str, inputs: str, **tolerance) -> None:
    for name, e in zip(("dq", "dk", "dv"), expected):
        check_close(got[name], e, name=f"{what} ({name})", inputs=inputs, **tolerance)


@pytest.mark.points(1)
def test_rejects_heads_that_do_not_divide(student):
    """H_kv must divide H: ValueError naming both."""
    with pytest.raises(ValueError, match="divide"):
        student.run(torch_forward_error, 4, 3)


@pytest.mark.points(6)
@pytest.mark.parametrize("B,H,H_kv,Nq,Nk,D,causal,block_m,block_n", CASES)
def test_forward_o_and_lse(student, B, H, H_kv, Nq, Nk, D, causal, block_m, block_n, make_qkv, attention_float64,
                           check_lse):
    """O and the logsumexp L in float64, tiles smaller than the sequence, lengths not multiples of the tiles."""
    q, k, v, _ = make_qkv(B, H, H_kv, Nq, Nk, D, seed=Nq, dtype=torch.float64)
    got = student.run(torch_forward, q, k, v, causal=causal, block_m=block_m, block_n=block_n)
    o_ref, lse_ref = attention_float64(q, k, v, causal=causal)
    inputs = describe(q=q, k=k, v=v, causal=causal, block_m=block_m, block_n=block_n)
    check_close(got["o"], o_ref, name="flash_attention_torch (O)", inputs=inputs)
    check_lse(got["lse"], lse_ref, name="flash_attention_torch (L = logsumexp)", inputs=inputs)


@pytest.mark.points(2)
def test_causal_offsets_sweep(student, make_qkv, attention_float64, grads_float64, check_lse):
    """Causal, Nq = 13 or 16, Nk = Nq + offset for every offset in [-8, 8] and two more, 8 x 8 tiles: the tile
    skipping (break/continue above the diagonal) is exact at every alignment, forward and backward."""
    cases, expected = [], []
    for offset in SWEEP_OFFSETS:
        Nq = 16 if offset % 2 else 13
        q, k, v, do = make_qkv(1, 2, 1, Nq, Nq + offset, 16, seed=100 + offset, dtype=torch.float64)
        o, lse = attention_float64(q, k, v, causal=True)
        cases.append(dict(q=q, k=k, v=v, do=do, o=o, lse=lse))
        expected.append((o, lse, grads_float64(q, k, v, do, causal=True)))
    got = student.run(torch_sweep, cases, block_m=8, block_n=8)
    for offset, case, result, (o, lse, grads) in zip(SWEEP_OFFSETS, cases, got, expected):
        inputs = describe(q=case["q"], k=case["k"], causal=True, block_m=8, block_n=8)
        check_close(result["o"], o, name=f"flash_attention_torch (O), Nk - Nq = {offset}", inputs=inputs)
        check_lse(result["lse"], lse, name=f"flash_attention_torch (L), Nk - Nq = {offset}", inputs=inputs)
        _check_grads(result, grads, what=f"flash_attention_backward_torch, Nk - Nq = {offset}", inputs=inputs)


@pytest.mark.points(6)
@pytest.mark.parametrize("B,H,H_kv,Nq,Nk,D,causal,block_m,block_n", CASES)
def test_backward_gradients(student, B, H, H_kv, Nq, Nk, D, causal, block_m, block_n, make_qkv, attention_float64,
                            grads_float64):
    """dQ, dK, dV from the K/V-outer loop with P recomputed from L and D = rowsum(dO * O)."""
    q, k, v, do = make_qkv(B, H, H_kv, Nq, Nk, D, seed=2 * Nq, dtype=torch.float64)
    o, lse = attention_float64(q, k, v, causal=causal)
    got = student.run(torch_backward, q, k, v, o, lse, do, causal=causal, block_m=block_m, block_n=block_n)
    _check_grads(got, grads_float64(q, k, v, do, causal=causal), what="flash_attention_backward_torch",
                 inputs=describe(q=q, k=k, v=v, causal=causal, block_m=block_m, block_n=block_n))


@pytest.mark.points(2)
@pytest.mark.parametrize("causal", [False, True])
def test_custom_scale_forward_and_backward(student, causal, make_qkv, attention_float64, grads_float64):
    """sm_scale = 0.3 (not 1/sqrt(D)) in both passes: the scale multiplies S, and dQ, dK (not dV)."""
    q, k, v, do = make_qkv(1, 2, 1, 26, 33, 16, seed=40, dtype=torch.float64)
    inputs = describe(q=q, k=k, v=v, causal=causal, sm_scale=0.3)
    got = student.run(torch_forward, q, k, v, causal=causal, block_m=8, block_n=16, sm_scale=0.3)
    o_ref, lse_ref = attention_float64(q, k, v, causal=causal, sm_scale=0.3)
    check_close(got["o"], o_ref, name="flash_attention_torch (O, sm_scale=0.3)", inputs=inputs)
    check_close(got["lse"], lse_ref, name="flash_attention_torch (L, sm_scale=0.3)", inputs=inputs)
    got = student.run(torch_backward, q, k, v, o_ref, lse_ref, do, causal=causal, block_m=16, block_n=8,
                      sm_scale=0.3)
    _check_grads(got, grads_float64(q, k, v, do, causal=causal, sm_scale=0.3),
                 what="flash_attention_backward_torch with sm_scale=0.3", inputs=inputs)


@pytest.mark.points(2)
def test_rows_that_see_no_key(student, make_qkv, attention_float64, grads_float64, check_lse):
    """Causal with Nq > Nk: the first Nq - Nk rows see no key, so O = 0, L = -inf, and their dQ is 0 (no nan)."""
    q, k, v, do = make_qkv(1, 2, 2, 30, 12, 16, seed=50, dtype=torch.float64)
    inputs = describe(q=q, k=k, v=v, causal=True)
    got = student.run(torch_forward, q, k, v, causal=True, block_m=8, block_n=8)
    o_ref, lse_ref = attention_float64(q, k, v, causal=True)
    check_close(got["o"], o_ref, name="flash_attention_torch (O, rows with no key)", inputs=inputs)
    check_lse(got["lse"], lse_ref, name="flash_attention_torch (L, rows with no key)", inputs=inputs)
    got = student.run(torch_backward, q, k, v, o_ref, lse_ref, do, causal=True, block_m=8, block_n=8)
    _check_grads(got, grads_float64(q, k, v, do, causal=True), what="flash_attention_backward_torch (rows with no "
                 "key)", inputs=inputs)


@pytest.mark.points(2)
def test_float32_inputs_accumulate_in_float32(student, make_qkv, attention_float64, grads_float64):
    """float32 inputs: O and the gradients come back in float32 and L in float32, accurate to fp32 rounding; a tile
    as large as the sequence (one tile) works too."""
    q, k, v, do = make_qkv(2, 4, 2, 21, 21, 16, seed=60)
    inputs = describe(q=q, k=k, v=v, causal=True)
    got = student.run(torch_forward, q, k, v, causal=True, block_m=32, block_n=32)
    assert got["o"].dtype == torch.float32 and got["lse"].dtype == torch.float32, (
        f"flash_attention_torch on float32 inputs returned O {got['o'].dtype} and L {got['lse'].dtype}; "
        "expected float32 for both")
    o_ref, lse_ref = attention_float64(q, k, v, causal=True)
    check_close(got["o"], o_ref, name="flash_attention_torch (O, float32)", inputs=inputs)
    check_close(got["lse"], lse_ref, name="flash_attention_torch (L, float32)", inputs=inputs)
    got = student.run(torch_backward, q, k, v, o_ref.float(), lse_ref.float(), do, causal=True, block_m=32,
                      block_n=32)
    assert all(got[name].dtype == torch.float32 for name in ("dq", "dk", "dv")), (
        "flash_attention_backward_torch on float32 inputs must return float32 gradients")
    _check_grads(got, grads_float64(q, k, v, do, causal=True), what="flash_attention_backward_torch (float32)",
                 inputs=inputs, atol=1e-5)
