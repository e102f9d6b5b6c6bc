"""Lab 02 hidden tests (quantization): other dtypes and edge groupings."""

import pytest
import torch

from common.testing import random_tensor


@pytest.mark.points(1)
def test_bf16_input_absmax_bound():
    from lab02_numerics.quantize import absmax_dequantize, absmax_quantize

    x = random_tensor(9, 31, seed=60, dtype=torch.bfloat16)
    q, scale = absmax_quantize(x, per_channel=True)
    error = (absmax_dequantize(q, scale).double() - x.double()).abs()
    assert (error <= scale.double() / 2 * (1 + 1e-5) + 1e-7).all(), "absmax bound on a bf16 input"
    assert absmax_dequantize(q, scale, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.points(1)
def test_int4_one_group_per_row_and_negative_zeropoint():
    from lab02_numerics.quantize import int4_dequantize, int4_quantize, zeropoint_dequantize, zeropoint_quantize

    w = random_tensor(5, 40, seed=61)
    qw = int4_quantize(w, group_size=40)
    assert qw.scales.shape == (5, 1)
    error = (int4_dequantize(qw) - w).abs()
    assert (error <= qw.scales / 2 * (1 + 1e-5) + 1e-7).all(), "int4 bound with group_size = K"
    x = -random_tensor(6, 20, seed=62).abs() - 1.0  # strictly negative data
    q, scale, zero_point = zeropoint_quantize(x, per_channel=False)
    assert int(q.min()) == -128 and int(q.max()) == 127
    assert ((zeropoint_dequantize(q, scale, zero_point) - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-7).all()
