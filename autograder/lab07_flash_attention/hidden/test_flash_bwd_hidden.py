"""Lab 07 hidden tests (backward): MQA with Nq != Nk and a non-contiguous upstream gradient."""

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(3)
def test_backward_mqa_ragged_non_contiguous_do(make_qkv, attention_float64, grads_float64, device):
    """MQA 4/1, Nq = 33 < Nk = 90, causal, dO a transposed view."""
    from common.testing import random_tensor
    from lab07_flash_attention.flash_bwd import flash_attn_bwd

    q, k, v, _ = make_qkv(1, 4, 1, 33, 90, 16, seed=21)
    do = random_tensor(1, 33, 4, 16, seed=25).to(device).transpose(1, 2)  # (B, H, N, D) view
    o64, lse64 = attention_float64(q, k, v, causal=True)
    got = flash_attn_bwd(q, k, v, o64.to(q.device, q.dtype), lse64.to(q.device, torch.float32), do, causal=True)
    expected = grads_float64(q, k, v, do, causal=True)
    inputs = describe(q=q, k=k, v=v, do=do)
    for name, g, e in zip(("dQ", "dK", "dV"), got, expected):
        check_close(g, e, name=f"flash_attn_bwd ({name})", inputs=inputs, atol=1e-5)
