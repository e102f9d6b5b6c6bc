"""Lab 07, part 1: FlashAttention-2 in plain PyTorch, tiled with the online softmax (flash_torch.py)."""

import pytest
import torch

from common.testing import check_close, describe

CASES = [
    # B, H, H_kv, Nq, Nk, D, causal, block_m, block_n
    (2, 2, 2, 37, 37, 16, False, 16, 16),
    (1, 4, 2, 45, 45, 16, True, 16, 8),
    (1, 2, 1, 19, 50, 32, True, 8, 16),  # Nq < Nk: the mask is aligned bottom-right
]


@pytest.mark.points(6)
@pytest.mark.parametrize("B,H,H_kv,Nq,Nk,D,causal,block_m,block_n", CASES)
def test_forward_o_and_lse(B, H, H_kv, Nq, Nk, D, causal, block_m, block_n, make_qkv, attention_float64):
    """O and the logsumexp L in float64, tiles smaller than the sequence, lengths not multiples of the tiles."""
    from lab07_flash_attention.flash_torch import flash_attention_torch

    q, k, v, _ = make_qkv(B, H, H_kv, Nq, Nk, D, seed=Nq, dtype=torch.float64, device="cpu")
    o, lse = flash_attention_torch(q, k, v, causal=causal, block_m=block_m, block_n=block_n)
    o_ref, lse_ref = attention_float64(q, k, v, causal=causal)
    inputs = describe(q=q, k=k, v=v, causal=causal, block_m=block_m, block_n=block_n)
    check_close(o, o_ref, name="flash_attention_torch (O)", inputs=inputs)
    check_close(lse, lse_ref, name="flash_attention_torch (L = logsumexp)", inputs=inputs)


@pytest.mark.points(6)
@pytest.mark.parametrize("B,H,H_kv,Nq,Nk,D,causal,block_m,block_n", CASES)
def test_backward_gradients(B, H, H_kv, Nq, Nk, D, causal, block_m, block_n, make_qkv, attention_float64,
                            grads_float64):
    """dQ, dK, dV from the K/V-outer loop with P recomputed from L and D = rowsum(dO * O)."""
    from lab07_flash_attention.flash_torch import flash_attention_backward_torch

    q, k, v, do = make_qkv(B, H, H_kv, Nq, Nk, D, seed=2 * Nq, dtype=torch.float64, device="cpu")
    o, lse = attention_float64(q, k, v, causal=causal)
    got = flash_attention_backward_torch(q, k, v, o, lse, do, causal=causal, block_m=block_m, block_n=block_n)
    expected = grads_float64(q, k, v, do, causal=causal)
    inputs = describe(q=q, k=k, v=v, causal=causal, block_m=block_m, block_n=block_n)
    for name, g, e in zip(("dQ", "dK", "dV"), got, expected):
        check_close(g, e, name=f"flash_attention_backward_torch ({name})", inputs=inputs)
