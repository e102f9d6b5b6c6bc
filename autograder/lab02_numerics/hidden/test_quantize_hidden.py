"""Lab 02 hidden tests (quantization): other dtypes and edge groupings."""

import pytest
import torch

from common.testing import random_tensor


@pytest.mark.points(1)
def test_bf16_input_absmax_bound(student):
    """A bf16 weight, per channel: the bound holds and dequantization to bf16 gives bf16."""
    from autograder.lab02_numerics.formulas import absmax_scale
    from autograder.lab02_numerics.test_quantize import _check_bound, absmax, absmax_deq

    x = random_tensor(9, 31, seed=60, dtype=torch.bfloat16)
    got = student.run(absmax, x, True)
    scale = absmax_scale(x, per_channel=True)
    assert torch.allclose(got["scale"].double(), scale, rtol=1e-6), "absmax scale on a bf16 input"
    _check_bound(x, student.run(absmax_deq, got["q"], got["scale"]), scale / 2, name="absmax bound on a bf16 input",
                 inputs="x (9, 31) bfloat16")
    assert student.run(absmax_deq, got["q"], got["scale"], "bfloat16").dtype == torch.bfloat16


@pytest.mark.points(1)
def test_int4_one_group_per_row_and_negative_zeropoint(student):
    """group_size = K (one scale per row), and strictly negative data under the zero point."""
    from autograder.lab02_numerics.formulas import zeropoint_scale
    from autograder.lab02_numerics.test_quantize import _check_bound, int4, int4_deq, zeropoint, zeropoint_deq

    w = random_tensor(5, 40, seed=61)
    got = student.run(int4, w, 40)
    assert got["scales"].shape == (5, 1), f"int4 scales with group_size = K: {tuple(got['scales'].shape)}"
    scales = w.double().abs().amax(dim=1, keepdim=True) / 7
    _check_bound(w, student.run(int4_deq, got["packed"], got["scales"], 40), scales / 2,
                 name="int4 bound with group_size = K", inputs="w (5, 40)")
    x = -random_tensor(6, 20, seed=62).abs() - 1.0  # strictly negative data
    got = student.run(zeropoint, x, False)
    assert int(got["q"].min()) == -128 and int(got["q"].max()) == 127
    scale, _ = zeropoint_scale(x, per_channel=False)
    _check_bound(x, student.run(zeropoint_deq, got["q"], got["scale"], got["zero_point"]), scale / 2,
                 name="zero point on negative data", inputs="x (6, 20)")
