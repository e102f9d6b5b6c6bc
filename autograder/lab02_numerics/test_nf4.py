"""Lab 02, part 3b: NF4, the QLoRA codebook, and double quantization of the scales (nf4.py)."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

# the NF4 levels as published with QLoRA (bitsandbytes' create_normal_map, float32)
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


@pytest.mark.points(2)
def test_codebook_values():
    """nf4_codebook() reproduces QLoRA's 16 levels: normal quantiles, asymmetric, exactly one zero."""
    from lab02_numerics.nf4 import nf4_codebook

    got = nf4_codebook()
    assert got.shape == (16,) and got.dtype == torch.float32, f"nf4_codebook: (16,) float32, got {describe(c=got)}"
    check_close(got, torch.tensor(QLORA_NF4, dtype=torch.float64), name="nf4_codebook vs QLoRA's levels",
                rtol=0, atol=1e-6)
    assert got[7] == 0.0, "codebook[7] must be exactly 0 (zero weights stay zero)"


@pytest.mark.points(3)
def test_quantize_nf4_picks_nearest_level():
    """Without double quantization: scales are block absmaxes, and each w / c1 maps to its nearest level."""
    from lab02_numerics.nf4 import NF4Config, dequantize_nf4, quantize_nf4

    w = random_tensor(11, 128, seed=21) * 0.02
    qw = quantize_nf4(w, config=NF4Config(block_size=64, double_quant=False))
    inputs = describe(w=w, block_size=64)
    assert qw.packed.dtype == torch.uint8 and qw.packed.shape == (11, 64), f"packed codes on {inputs}"
    check_close(qw.scales, w.reshape(11, 2, 64).abs().amax(-1), name="quantize_nf4 block scales", inputs=inputs)
    w_hat = dequantize_nf4(qw)
    levels = torch.tensor(QLORA_NF4, dtype=torch.float64)
    scales = qw.scales.double().repeat_interleave(64, dim=1)  # (11, 128)
    normed = w.double() / scales
    best = (normed[..., None] - levels).abs().min(dim=-1).values  # distance to the nearest level
    chosen = (w_hat.double() / scales - normed).abs()
    worst = (chosen - best).max().item()
    assert worst < 1e-5, f"dequantize_nf4(quantize_nf4(w)) on {inputs}: some weight is {worst:.3g} farther from " \
                         f"its level than the nearest level is"


@pytest.mark.points(2)
def test_double_quantization_bound():
    """Double quantization: |c1 - c1'| <= c2 / 2, c2 = max|c1 - mean| / 127 per block of 256 scales (last one short)."""
    from lab02_numerics.nf4 import dequantize_scales, double_quantize

    scales = random_tensor(600, seed=22).abs() * 0.05 + 0.01  # 600 = 2 full blocks of 256 and one of 88
    qs = double_quantize(scales, scale_block_size=256)
    assert qs.q.dtype == torch.int8 and qs.q.shape == (600,), f"double_quantize codes: {describe(q=qs.q)}"
    assert qs.second_scales.shape == (3,), f"3 second-level constants for 600 scales, got {tuple(qs.second_scales.shape)}"
    centred = scales.double() - scales.double().mean()
    c2 = torch.stack([centred[i:i + 256].abs().max() / 127 for i in range(0, 600, 256)])
    check_close(qs.second_scales, c2, name="double_quantize second-level constants c2", dtype=torch.float32)
    error = (dequantize_scales(qs).double() - scales.double()).abs()
    allowed = (c2 / 2).repeat_interleave(256)[:600] * (1 + 1e-5) + 1e-9
    assert (error <= allowed).all(), f"dequantize_scales: error {error.max().item():.3g} exceeds c2 / 2 " \
                                     f"(largest excess at scale {int((error - allowed).argmax())})"


@pytest.mark.points(2)
def test_nf4_with_double_quant_round_trip_and_size():
    """The QLoRA default (blocks of 64, double quant): 4.127 bits per weight, and the error is NF4's own plus
    the scales' (at most c1 error per weight)."""
    from lab02_numerics.nf4 import NF4Config, dequantize_nf4, quantize_nf4

    w = random_tensor(64, 256, seed=23) * 0.02
    single = quantize_nf4(w, config=NF4Config(double_quant=False))
    double = quantize_nf4(w, config=NF4Config(double_quant=True))
    bits = 8 * double.nbytes() / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())) < 1e-9, f"NF4Weight.nbytes: {bits} bits/weight"
    assert torch.equal(single.packed, double.packed), "double quantization must not change the 4-bit codes"
    scale_error = (double.block_scales() - single.scales).abs().repeat_interleave(64, dim=1)  # (64, 256)
    difference = (dequantize_nf4(double) - dequantize_nf4(single)).abs()
    assert (difference <= scale_error * (1 + 1e-5) + 1e-9).all(), \
        "dequantize_nf4 with double quant differs from single by more than the scale error"
    with pytest.raises(ValueError, match="must divide K"):
        quantize_nf4(random_tensor(4, 96, seed=24), config=NF4Config(block_size=64))
    with pytest.raises(TypeError, match="dtype"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int8))
