"""Lab 07, part 2: the Triton forward kernel (flash_fwd.py).

O and the logsumexp L against float64, causal and not, Nq != Nk, lengths that are not multiples of the tile, GQA and
MQA, several head dims and tile shapes, non-contiguous inputs. fp32 inputs (the interpreter's precision on CPU).
"""

import pytest
import torch

from common.testing import check_close, describe


def _check_forward(q, k, v, causal, attention_float64, *, config=None, sm_scale=None, what=""):
    from lab07_flash_attention.flash_fwd import flash_attn_fwd

    o, lse = flash_attn_fwd(q, k, v, causal=causal, sm_scale=sm_scale, config=config)
    o_ref, lse_ref = attention_float64(q, k, v, causal=causal, sm_scale=sm_scale)
    inputs = describe(q=q, k=k, v=v, causal=causal, config=config, sm_scale=sm_scale)
    check_close(o, o_ref, name=f"flash_attn_fwd (O){what}", inputs=inputs)
    check_close(lse, lse_ref, name=f"flash_attn_fwd (L = logsumexp){what}", inputs=inputs)
    return o, lse


@pytest.mark.points(6)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [16, 77, 160])
def test_forward_matches_float64(N, causal, make_qkv, attention_float64):
    """Self-attention, Nq = Nk = N: one tile, a ragged last tile, and several full tiles before the diagonal."""
    q, k, v, _ = make_qkv(2, 2, 2, N, N, 16, seed=N)
    _check_forward(q, k, v, causal, attention_float64)


@pytest.mark.points(4)
@pytest.mark.parametrize("Nq,Nk", [(23, 61), (61, 23), (1, 45)])
def test_forward_nq_differs_from_nk(Nq, Nk, make_qkv, attention_float64):
    """Causal with Nq != Nk: the mask is aligned bottom-right (query i sees keys j <= i + Nk - Nq). With Nq > Nk
    the first rows see no key at all: O = 0 and L = -inf there. Nq = 1 is a decoding step."""
    q, k, v, _ = make_qkv(1, 2, 1, Nq, Nk, 32, seed=Nq + Nk)
    _check_forward(q, k, v, True, attention_float64, what=f" with Nq={Nq}, Nk={Nk}")
    _check_forward(q, k, v, False, attention_float64, what=f" with Nq={Nq}, Nk={Nk}, not causal")


@pytest.mark.points(4)
@pytest.mark.parametrize("H,H_kv", [(4, 2), (3, 1)])
def test_forward_gqa_and_mqa(H, H_kv, make_qkv, attention_float64):
    """Grouped-query (4 query heads on 2 K/V heads) and multi-query (3 on 1) attention, causal."""
    q, k, v, _ = make_qkv(2, H, H_kv, 41, 41, 16, seed=H)
    _check_forward(q, k, v, True, attention_float64, what=f" (GQA {H}/{H_kv})")


@pytest.mark.points(3)
@pytest.mark.parametrize("D,block_m,block_n", [(16, 16, 32), (32, 32, 16), (64, 16, 16)])
def test_forward_head_dims_and_tiles(D, block_m, block_n, make_qkv, attention_float64):
    """Head dims 16..64 and tiles with BLOCK_M != BLOCK_N (the diagonal spans several tiles), a custom scale."""
    from lab07_flash_attention.flash_fwd import KernelConfig

    q, k, v, _ = make_qkv(1, 2, 1, 50, 50, D, seed=D)
    config = KernelConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    _check_forward(q, k, v, True, attention_float64, config=config, sm_scale=0.3)


@pytest.mark.points(2)
def test_forward_non_contiguous_inputs(device, attention_float64):
    """q, k, v made (B, N, H, D) and transposed to (B, H, N, D) views, as an attention layer produces them."""
    from common.testing import random_tensor

    q = random_tensor(2, 37, 4, 16, seed=11).to(device).transpose(1, 2)  # (B, H, N, D), stride(2) = H * D
    k = random_tensor(2, 37, 2, 16, seed=12).to(device).transpose(1, 2)
    v = random_tensor(2, 37, 2, 16, seed=13).to(device).transpose(1, 2)
    assert not q.is_contiguous()
    _check_forward(q, k, v, True, attention_float64, what=" (non-contiguous inputs)")
