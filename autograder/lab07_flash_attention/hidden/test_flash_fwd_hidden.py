"""Lab 07 hidden tests (forward): shapes and layouts the public tests do not show."""

import pytest

from common.testing import check_close, describe


@pytest.mark.points(3)
@pytest.mark.parametrize("B,H,H_kv,Nq,Nk,D,causal", [(3, 4, 1, 1, 97, 32, True), (1, 6, 3, 99, 99, 16, True),
                                                     (2, 2, 2, 17, 143, 16, False)])
def test_forward_more_shapes(student, B, H, H_kv, Nq, Nk, D, causal, make_qkv, attention_float64, check_lse):
    """A batched MQA decode step, GQA 6/3 with N = 99, a short query block against 143 keys."""
    from autograder.lab07_flash_attention.test_flash_fwd import triton_forward

    q, k, v, _ = make_qkv(B, H, H_kv, Nq, Nk, D, seed=Nq * 3 + Nk)
    got = student.run(triton_forward, q, k, v, causal=causal)
    o_ref, lse_ref = attention_float64(q, k, v, causal=causal)
    inputs = describe(q=q, k=k, v=v, causal=causal)
    check_close(got["o"], o_ref, name="flash_attn_fwd (O)", inputs=inputs)
    check_lse(got["lse"], lse_ref, name="flash_attn_fwd (L)", inputs=inputs)


@pytest.mark.points(1)
def test_forward_large_logits_stay_finite(student, make_qkv, attention_float64):
    """Scores around +-400: the online softmax must subtract the running max (no overflow to inf/nan)."""
    from autograder.lab07_flash_attention.test_flash_fwd import triton_forward

    q, k, v, _ = make_qkv(1, 2, 2, 70, 70, 16, seed=4)
    q = q * 25.0
    got = student.run(triton_forward, q, k, v, causal=True)
    o_ref, lse_ref = attention_float64(q, k, v, causal=True)
    check_close(got["o"], o_ref, name="flash_attn_fwd (O, large logits)", inputs=describe(q=q), atol=1e-5)
    check_close(got["lse"], lse_ref, name="flash_attn_fwd (L, large logits)", inputs=describe(q=q))
