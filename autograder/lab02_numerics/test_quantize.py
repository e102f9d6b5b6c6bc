"""Lab 02, part 3a: int8 absmax and zero-point, int4 packing and group-wise int4 (quantize.py)."""

import pytest
import torch

from common.testing import describe, random_tensor

SLACK = 1e-5  # float32 rounding of x / s and s * q, relative to the scale


def _check_bound(x, x_hat, half_step, *, name, inputs):
    """|x - x_hat| <= half_step (broadcast) everywhere, with float32 slack."""
    error = (x.double() - x_hat.double()).abs()
    allowed = half_step.double() * (1 + SLACK) + 1e-7
    excess = error - allowed
    if (excess > 0).any():
        index = [int(i) for i in torch.unravel_index(excess.argmax(), excess.shape)]
        raise AssertionError(f"{name} on input {inputs}: error {error[tuple(index)].item():.4g} at index {index} "
                             f"exceeds the bound scale / 2 = {allowed.expand_as(error)[tuple(index)].item():.4g}")


@pytest.mark.points(3)
@pytest.mark.parametrize("per_channel", [False, True])
def test_absmax_error_bound(per_channel):
    """Symmetric int8: s = max|x| / 127 (per tensor or per row), and |x - deq(q(x))| <= s / 2."""
    from lab02_numerics.quantize import absmax_dequantize, absmax_quantize

    x = random_tensor(37, 53, seed=11) * torch.linspace(0.1, 3.0, 37)[:, None]  # rows of very different ranges
    q, scale = absmax_quantize(x, per_channel=per_channel)
    inputs = describe(x=x, per_channel=per_channel)
    assert q.dtype == torch.int8 and q.shape == x.shape, f"absmax_quantize must return int8 {tuple(x.shape)}"
    expected_scale = (x.abs().amax(dim=1, keepdim=True) if per_channel else x.abs().amax()) / 127
    assert scale.shape == expected_scale.shape, f"absmax_quantize scale shape {tuple(scale.shape)}, expected " \
                                                f"{tuple(expected_scale.shape)}"
    assert torch.allclose(scale.double(), expected_scale.double(), rtol=1e-6), f"absmax_quantize scale on {inputs}"
    assert int(q.abs().max()) == 127, "the largest |x| must map to +-127"
    _check_bound(x, absmax_dequantize(q, scale), scale / 2, name="absmax_dequantize(absmax_quantize(x))",
                 inputs=inputs)


@pytest.mark.points(2)
def test_per_channel_beats_per_tensor_with_outlier_row():
    """One outlier row coarsens the per-tensor grid for every row; per-channel scales keep the others fine."""
    from lab02_numerics.quantize import absmax_dequantize, absmax_quantize

    x = random_tensor(16, 64, seed=12)
    x[3] *= 100.0
    errors = {}
    for per_channel in (False, True):
        q, scale = absmax_quantize(x, per_channel=per_channel)
        errors[per_channel] = (absmax_dequantize(q, scale) - x).pow(2).mean().sqrt().item()
    assert errors[True] < 0.5 * errors[False], f"RMS error per channel {errors[True]:.3g} vs per tensor " \
                                               f"{errors[False]:.3g}: per channel should be far smaller"


@pytest.mark.points(2)
@pytest.mark.parametrize("per_channel", [False, True])
def test_zeropoint_error_bound(per_channel):
    """Asymmetric int8 on one-sided data: all 256 levels used, min -> -128 and max -> 127, |error| <= s / 2."""
    from lab02_numerics.quantize import zeropoint_dequantize, zeropoint_quantize

    x = random_tensor(21, 45, seed=13).abs() + 0.5  # strictly positive: absmax would waste the negative half
    q, scale, zero_point = zeropoint_quantize(x, per_channel=per_channel)
    inputs = describe(x=x, per_channel=per_channel)
    assert q.dtype == torch.int8 and q.shape == x.shape, f"zeropoint_quantize must return int8 {tuple(x.shape)}"
    assert int(q.min()) == -128 and int(q.max()) == 127, f"zeropoint_quantize on {inputs}: codes span " \
                                                         f"[{int(q.min())}, {int(q.max())}], expected [-128, 127]"
    expected_scale = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 255 if per_channel \
        else (x.max() - x.min()) / 255
    assert torch.allclose(scale.double(), expected_scale.double(), rtol=1e-5), f"zeropoint scale on {inputs}"
    _check_bound(x, zeropoint_dequantize(q, scale, zero_point), scale / 2,
                 name="zeropoint_dequantize(zeropoint_quantize(x))", inputs=inputs)


@pytest.mark.points(2)
def test_pack_unpack_round_trip():
    """pack_int4 puts column 2j in the low nibble of byte j and 2j + 1 in the high one (as q + 8); unpack inverts it."""
    from lab02_numerics.quantize import pack_int4, unpack_int4

    q = torch.randint(-8, 8, (13, 46), generator=torch.Generator().manual_seed(14), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (13, 23), \
        f"pack_int4 of {describe(q=q)} must give uint8 (13, 23), got {packed.dtype} {tuple(packed.shape)}"
    expected = ((q[:, 0::2].int() + 8) | ((q[:, 1::2].int() + 8) << 4)).to(torch.uint8)
    assert torch.equal(packed, expected), "pack_int4: byte j must be (q[2j] + 8) | (q[2j + 1] + 8) << 4"
    assert torch.equal(unpack_int4(packed), q), "unpack_int4(pack_int4(q)) must return q exactly"
    every_code = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    assert torch.equal(unpack_int4(pack_int4(every_code)), every_code), "round trip of all 16 codes"


@pytest.mark.points(2)
def test_int4_group_error_bound():
    """Group-wise int4: one scale s = max|w| / 7 per group of P along K, and |w - deq(q(w))| <= s / 2."""
    from lab02_numerics.quantize import int4_dequantize, int4_quantize

    w = random_tensor(19, 96, seed=15) * torch.linspace(0.2, 2.0, 96)  # ranges that differ from group to group
    qw = int4_quantize(w, group_size=32)
    inputs = describe(w=w, group_size=32)
    assert qw.packed.shape == (19, 48) and qw.scales.shape == (19, 3), \
        f"int4_quantize on {inputs}: packed {tuple(qw.packed.shape)}, scales {tuple(qw.scales.shape)}"
    expected_scales = w.reshape(19, 3, 32).abs().amax(dim=-1) / 7
    assert torch.allclose(qw.scales.double(), expected_scales.double(), rtol=1e-6), f"int4 scales on {inputs}"
    half_step = (qw.scales / 2).repeat_interleave(32, dim=1)  # (19, 96)
    _check_bound(w, int4_dequantize(qw), half_step, name="int4_dequantize(int4_quantize(w))", inputs=inputs)


@pytest.mark.points(2)
def test_bad_input_is_refused():
    """A group size that does not divide K, an odd K, and an unsupported dtype each get a clear error."""
    from lab02_numerics.quantize import absmax_quantize, int4_quantize, pack_int4

    w = random_tensor(8, 96, seed=16)
    with pytest.raises(ValueError, match="must divide K"):
        int4_quantize(w, group_size=64)
    with pytest.raises(ValueError, match="even"):
        int4_quantize(random_tensor(8, 33, seed=17), group_size=33)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(4, 7, dtype=torch.int8))
    with pytest.raises(TypeError, match="dtype"):
        int4_quantize(w.to(torch.int32), group_size=32)
    with pytest.raises(TypeError, match="dtype"):
        absmax_quantize(w.to(torch.int64), per_channel=True)
