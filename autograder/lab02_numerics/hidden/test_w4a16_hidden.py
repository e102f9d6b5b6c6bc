"""Lab 02 hidden tests (W4A16): several M tiles, NF4 without double quantization."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_many_m_tiles_nf4_single_quant(device):
    from lab02_numerics.nf4 import NF4Config, dequantize_nf4, quantize_nf4
    from lab02_numerics.w4a16 import w4a16_matmul

    x = random_tensor(33, 128, seed=70).to(device)
    weight = quantize_nf4(random_tensor(17, 128, seed=71).to(device), config=NF4Config(block_size=32, double_quant=False))
    expected = x.double() @ dequantize_nf4(weight).double().t()
    check_close(w4a16_matmul(x, weight), expected, name="w4a16_matmul (nf4, 3 M tiles)",
                inputs=describe(x=x, N=17), dtype=torch.float32, atol=1e-5 * float(expected.abs().max()))
