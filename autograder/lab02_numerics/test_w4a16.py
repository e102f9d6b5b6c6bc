"""Lab 02, part 4: the Triton W4A16 kernel (w4a16.py) against dequantize-then-matmul: in the interpreter on CPU,
compiled (on CUDA tensors) where there is a GPU."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


def _reference(x, weight):
    """x @ W'^T in float64, W' dequantized by the lab's own (separately tested) dequantizers."""
    from lab02_numerics.nf4 import NF4Weight, dequantize_nf4
    from lab02_numerics.quantize import int4_dequantize

    w = dequantize_nf4(weight) if isinstance(weight, NF4Weight) else int4_dequantize(weight)
    return x.double() @ w.double().t()


def _check(x, weight, got, *, name):
    # fp32 tolerance; atol scales with sqrt(K) * |x| * |W'|, the size of fp32 accumulation error over K terms
    expected = _reference(x, weight)
    K = x.shape[1]
    check_close(got, expected, name=name, inputs=describe(x=x, N=weight.shape[0]), dtype=torch.float32,
                atol=1e-6 * K ** 0.5 * float(expected.abs().max()))


@pytest.mark.points(4)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("M, N, K, group_size", [(1, 45, 256, 64), (7, 33, 128, 32), (19, 50, 256, 128)])
def test_int4_matches_reference(M, N, K, group_size, device):
    """Group-wise int4, ragged M and N (masks), one and several M tiles, against float64 dequantize-then-matmul."""
    from lab02_numerics.quantize import int4_quantize
    from lab02_numerics.w4a16 import w4a16_matmul

    x = random_tensor(M, K, seed=31).to(device)
    weight = int4_quantize(random_tensor(N, K, seed=32).to(device) * 0.05, group_size=group_size)
    got = w4a16_matmul(x, weight)
    assert got.shape == (M, N) and got.dtype == x.dtype, f"w4a16_matmul: expected ({M}, {N}) {x.dtype}, got " \
                                                         f"{tuple(got.shape)} {got.dtype}"
    _check(x, weight, got, name="w4a16_matmul (int4)")


@pytest.mark.points(3)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("M, N", [(3, 37), (16, 24)])
def test_nf4_matches_reference(M, N, device):
    """NF4 with double-quantized scales (QLoRA's format), blocks of 64."""
    from lab02_numerics.nf4 import NF4Config, quantize_nf4
    from lab02_numerics.w4a16 import w4a16_matmul

    x = random_tensor(M, 192, seed=33).to(device)
    weight = quantize_nf4(random_tensor(N, 192, seed=34).to(device) * 0.02, config=NF4Config(block_size=64))
    _check(x, weight, w4a16_matmul(x, weight), name="w4a16_matmul (nf4)")


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_tiles_split_k_and_strides(device):
    """Several groups per K step, split-K partial sums, and a non-contiguous x all give the same answer."""
    from lab02_numerics.quantize import int4_quantize
    from lab02_numerics.w4a16 import W4A16Config, w4a16_matmul

    x = random_tensor(512, 5, seed=35).to(device).t()  # (5, 512), stride (1, 5): not contiguous
    weight = int4_quantize(random_tensor(40, 512, seed=36).to(device), group_size=32)
    config = W4A16Config(block_m=16, block_n=32, block_k=128, split_k=2, num_stages=1)
    _check(x, weight, w4a16_matmul(x, weight, config=config), name=f"w4a16_matmul ({config})")


@pytest.mark.points(2)
def test_bad_input_is_refused(device):
    """Unsupported activation dtype, mismatched K, and a block_k that is not a multiple of the group size."""
    from lab02_numerics.quantize import int4_quantize
    from lab02_numerics.w4a16 import W4A16Config, w4a16_matmul

    weight = int4_quantize(random_tensor(16, 128, seed=37).to(device), group_size=64)
    with pytest.raises(TypeError, match="dtype"):
        w4a16_matmul(random_tensor(2, 128, seed=38, dtype=torch.float64).to(device), weight)
    with pytest.raises(ValueError, match="K"):
        w4a16_matmul(random_tensor(2, 96, seed=39).to(device), weight)
    with pytest.raises(ValueError, match="multiple of group_size"):
        w4a16_matmul(random_tensor(2, 128, seed=40).to(device), weight, config=W4A16Config(block_k=32))
    with pytest.raises(ValueError, match="power of two"):
        w4a16_matmul(random_tensor(2, 96, seed=41).to(device),
                     int4_quantize(random_tensor(8, 96, seed=42).to(device), group_size=48))
