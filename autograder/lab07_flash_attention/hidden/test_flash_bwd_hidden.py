"""Lab 07 hidden tests (backward): MQA with Nq != Nk and a non-contiguous upstream gradient, and the atomic variant
on a second shape."""

import pytest

from common.testing import check_close, describe, random_tensor


def _check(student, q, k, v, do, causal, attention_float64, grads_float64, *, sm_scale=None, config=None,
           do_heads_last=False):
    from autograder.lab07_flash_attention.test_flash_bwd import triton_backward

    o64, lse64 = attention_float64(q, k, v, causal=causal, sm_scale=sm_scale)
    got = student.run(triton_backward, q, k, v, o64.float(), lse64.float(), do, causal=causal, sm_scale=sm_scale,
                      config=config, do_heads_last=do_heads_last)
    if do_heads_last:
        do = do.transpose(1, 2)
    inputs = describe(q=q, k=k, v=v, do=do, sm_scale=sm_scale, config=config)
    for name, e in zip(("dq", "dk", "dv"), grads_float64(q, k, v, do, causal=causal, sm_scale=sm_scale)):
        check_close(got[name], e, name=f"flash_attn_bwd ({name})", inputs=inputs, atol=1e-5)


@pytest.mark.points(3)
def test_backward_mqa_ragged_non_contiguous_do(student, make_qkv, attention_float64, grads_float64):
    """MQA 4/1, Nq = 33 < Nk = 90, causal, dO a transposed view."""
    q, k, v, _ = make_qkv(1, 4, 1, 33, 90, 16, seed=21)
    do = random_tensor(1, 33, 4, 16, seed=25)  # (B, N, H, D), transposed in the worker
    _check(student, q, k, v, do, True, attention_float64, grads_float64, do_heads_last=True)


@pytest.mark.points(1)
def test_backward_atomic_dq_gqa_batched(student, make_qkv, attention_float64, grads_float64):
    """The atomic-dQ variant, batch 2, GQA 4/2, causal, Nq = 48 > Nk = 40, a custom scale 0.5."""
    q, k, v, do = make_qkv(2, 4, 2, 48, 40, 16, seed=26)
    _check(student, q, k, v, do, True, attention_float64, grads_float64, sm_scale=0.5,
           config=dict(dkdv=dict(block_m=16, block_n=16), deterministic=False))
