"""Lab 07, part 3: the Triton backward kernels (flash_bwd.py).

dQ, dK, dV against float64 autograd, given the float64 O and L (so only the backward is tested), causal and not,
GQA/MQA (dK, dV summed over a group's query heads), Nq != Nk, ragged lengths; and determinism.
"""

import pytest
import torch

from common.testing import check_close, describe


def _check_backward(q, k, v, do, causal, attention_float64, grads_float64, *, config=None, what=""):
    from lab07_flash_attention.flash_bwd import flash_attn_bwd

    o64, lse64 = attention_float64(q, k, v, causal=causal)
    o, lse = o64.to(q.device, q.dtype), lse64.to(q.device, torch.float32)
    got = flash_attn_bwd(q, k, v, o, lse, do, causal=causal, config=config)
    expected = grads_float64(q, k, v, do, causal=causal)
    inputs = describe(q=q, k=k, v=v, causal=causal, config=config)
    for name, g, e in zip(("dQ", "dK", "dV"), got, expected):
        # each gradient entry sums up to N fp32 products: a little more absolute slack than one fp32 rounding
        check_close(g, e, name=f"flash_attn_bwd ({name}){what}", inputs=inputs, atol=1e-5)
    return got


@pytest.mark.points(6)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [16, 77, 130])
def test_backward_matches_float64(N, causal, make_qkv, attention_float64, grads_float64):
    """Self-attention gradients: one tile, ragged tiles, diagonal and full tiles."""
    q, k, v, do = make_qkv(1, 2, 2, N, N, 16, seed=N)
    _check_backward(q, k, v, do, causal, attention_float64, grads_float64)


@pytest.mark.points(4)
@pytest.mark.parametrize("H,H_kv", [(4, 2), (3, 1)])
def test_backward_gqa_sums_over_the_group(H, H_kv, make_qkv, attention_float64, grads_float64):
    """GQA/MQA: dK and dV of a K/V head are the sums over the query heads that share it."""
    q, k, v, do = make_qkv(2, H, H_kv, 45, 45, 16, seed=10 + H)
    _check_backward(q, k, v, do, True, attention_float64, grads_float64, what=f" (GQA {H}/{H_kv})")


@pytest.mark.points(4)
@pytest.mark.parametrize("Nq,Nk", [(29, 70), (70, 29)])
def test_backward_nq_differs_from_nk(Nq, Nk, make_qkv, attention_float64, grads_float64):
    """Causal with Nq != Nk (bottom-right), including rows that see no key (Nq > Nk): their gradient is 0."""
    from lab07_flash_attention.flash_fwd import KernelConfig
    from lab07_flash_attention.flash_bwd import BackwardConfig

    q, k, v, do = make_qkv(1, 2, 1, Nq, Nk, 32, seed=Nq)
    config = BackwardConfig(dkdv=KernelConfig(block_m=16, block_n=32), dq=KernelConfig(block_m=32, block_n=16))
    _check_backward(q, k, v, do, True, attention_float64, grads_float64, config=config,
                    what=f" with Nq={Nq}, Nk={Nk}")


@pytest.mark.points(2)
def test_backward_is_deterministic(make_qkv, attention_float64):
    """Two runs give bit-identical gradients (no atomics: dQ has its own kernel)."""
    from lab07_flash_attention.flash_bwd import flash_attn_bwd

    q, k, v, do = make_qkv(1, 4, 2, 64, 64, 16, seed=3)
    o64, lse64 = attention_float64(q, k, v, causal=True)
    o, lse = o64.to(q.device, q.dtype), lse64.to(q.device, torch.float32)
    first = flash_attn_bwd(q, k, v, o, lse, do, causal=True)
    second = flash_attn_bwd(q, k, v, o, lse, do, causal=True)
    for name, a, b in zip(("dQ", "dK", "dV"), first, second):
        assert torch.equal(a, b), f"flash_attn_bwd ({name}) differs between two runs on {describe(q=q, k=k)}"


@pytest.mark.points(2)
def test_backward_atomic_dq_variant(make_qkv, attention_float64, grads_float64):
    """BackwardConfig(deterministic=False): dQ accumulated by atomics inside the dK/dV kernel, same gradients."""
    from lab07_flash_attention.flash_bwd import BackwardConfig
    from lab07_flash_attention.flash_fwd import KernelConfig

    q, k, v, do = make_qkv(1, 4, 2, 57, 57, 16, seed=31)
    config = BackwardConfig(dkdv=KernelConfig(block_m=16, block_n=32), dq=KernelConfig(), deterministic=False)
    _check_backward(q, k, v, do, True, attention_float64, grads_float64, config=config, what=" (atomic dQ)")
