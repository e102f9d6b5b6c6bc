"""Lab 02, part 3b: NF4, the QLoRA codebook, and double quantization of the scales (nf4.py).

Expectations come from formulas.py; dequantizers get codes and scales the grader made. Config fields are tested away
from their defaults (block sizes 32 and 128, scale blocks of 7 and 100), and all-zero blocks must stay finite.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

# the NF4 levels as published with QLoRA (bitsandbytes' create_normal_map, float32)
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "int8": torch.int8}


# -----------------------------------------------------------------------------
# Producers: run in the worker


def codebook(dtype: str | None = None) -> torch.Tensor:
    from lab02_numerics.nf4 import nf4_codebook

    return nf4_codebook() if dtype is None else nf4_codebook(dtype=DTYPES[dtype])


def _stored(qw) -> dict:
    from lab02_numerics.nf4 import QuantizedScales

    out = {"packed": qw.packed, "block_size": qw.block_size, "shape": tuple(qw.shape)}
    if isinstance(qw.scales, QuantizedScales):
        s = qw.scales
        out["double"] = {"q": s.q, "second": s.second_scales, "mean": s.mean, "block": s.scale_block_size}
    else:
        out["scales"] = qw.scales
    return out


def nf4(w: torch.Tensor, config: dict | None = None, *, dequantize: bool = False) -> dict:
    """quantize_nf4(w, config=NF4Config(**config)) (the default config when None), as plain tensors."""
    from lab02_numerics.nf4 import NF4Config, dequantize_nf4, quantize_nf4

    qw = quantize_nf4(w) if config is None else quantize_nf4(w, config=NF4Config(**config))
    out = _stored(qw)
    out["nbytes"] = qw.nbytes()
    if dequantize:
        out["w_hat"] = dequantize_nf4(qw)
        out["block_scales"] = qw.block_scales()
    return out


def nf4_deq(packed: torch.Tensor, block_size: int, scales: torch.Tensor | None = None, double: dict | None = None,
            dtype: str | None = None) -> torch.Tensor:
    """dequantize_nf4 of a weight the grader made (plain scales, or double-quantized ones)."""
    from lab02_numerics.nf4 import NF4Weight, QuantizedScales, dequantize_nf4

    if double is not None:
        scales = QuantizedScales(q=double["q"], second_scales=double["second"], mean=double["mean"],
                                 scale_block_size=double["block"])
    qw = NF4Weight(packed=packed, scales=scales, block_size=block_size, shape=(packed.shape[0], 2 * packed.shape[1]))
    return dequantize_nf4(qw) if dtype is None else dequantize_nf4(qw, dtype=DTYPES[dtype])


def double_q(scales: torch.Tensor, scale_block_size: int | None) -> dict:
    from lab02_numerics.nf4 import double_quantize

    qs = double_quantize(scales) if scale_block_size is None else \
        double_quantize(scales, scale_block_size=scale_block_size)
    return {"q": qs.q, "second": qs.second_scales, "mean": qs.mean, "block": qs.scale_block_size}


def double_deq(q: torch.Tensor, second: torch.Tensor, mean: torch.Tensor, block: int) -> torch.Tensor:
    from lab02_numerics.nf4 import QuantizedScales, dequantize_scales

    return dequantize_scales(QuantizedScales(q=q, second_scales=second, mean=mean, scale_block_size=block))


def nf4_error(w: torch.Tensor, dtype: str | None = None, config: dict | None = None) -> None:
    from lab02_numerics.nf4 import NF4Config, quantize_nf4

    quantize_nf4(w if dtype is None else w.to(DTYPES[dtype]), config=NF4Config(**(config or {})))


def double_error(scales: torch.Tensor) -> None:
    from lab02_numerics.nf4 import double_quantize

    double_quantize(scales)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _check_nf4_codes(got: dict, w: torch.Tensor, block_size: int, *, inputs: str) -> torch.Tensor:
    """Scales are block absmaxes; every nibble is the index of a nearest level of w / c1. Returns the scales."""
    from autograder.lab02_numerics.formulas import nf4_levels, unpack_nibbles

    N, K = w.shape
    assert got["packed"].dtype == torch.uint8 and got["packed"].shape == (N, K // 2), \
        f"quantize_nf4 on {inputs}: packed {got['packed'].dtype} {tuple(got['packed'].shape)}, expected uint8 " \
        f"{(N, K // 2)}"
    assert got["block_size"] == block_size and got["shape"] == (N, K), \
        f"quantize_nf4 on {inputs}: block_size {got['block_size']}, shape {got['shape']}"
    scales = w.double().reshape(N, K // block_size, block_size).abs().amax(-1).clamp_min(1e-12)
    if "scales" in got:
        check_close(got["scales"], scales, name="quantize_nf4 block scales (absmax per block)", inputs=inputs,
                    rtol=1e-6)
    levels = nf4_levels()
    normed = w.double() / scales.repeat_interleave(block_size, dim=1)
    best = (normed[..., None] - levels).abs().min(dim=-1).values  # distance to the nearest level
    chosen = (levels[unpack_nibbles(got["packed"]) + 8] - normed).abs()
    worst = (chosen - best).max().item()
    assert worst < 1e-5, f"quantize_nf4 on {inputs}: some weight's code is {worst:.3g} farther from w / c1 than the " \
                         "nearest level (the nibble is the level's index, 0..15)"
    return scales


@pytest.mark.points(2)
def test_codebook_values(student):
    """nf4_codebook() reproduces QLoRA's 16 levels: normal quantiles, asymmetric, exactly one zero; in float64 it
    matches the float64 quantiles."""
    from autograder.lab02_numerics.formulas import nf4_levels

    got = student.run(codebook)
    assert got.shape == (16,) and got.dtype == torch.float32, f"nf4_codebook: (16,) float32, got {describe(c=got)}"
    check_close(got, torch.tensor(QLORA_NF4, dtype=torch.float64), name="nf4_codebook vs QLoRA's levels",
                rtol=0, atol=1e-6)
    assert got[7] == 0.0, "codebook[7] must be exactly 0 (zero weights stay zero)"
    wide = student.run(codebook, "float64")
    assert wide.dtype == torch.float64, f"nf4_codebook(dtype=torch.float64) returned {wide.dtype}"
    check_close(wide, nf4_levels(), name="nf4_codebook(dtype=float64) vs the float64 normal quantiles")


@pytest.mark.points(3)
@pytest.mark.parametrize("block_size", [64, 32, 128])
def test_quantize_nf4_picks_nearest_level(student, block_size):
    """Without double quantization: scales are block absmaxes (blocks of 64, 32 and 128), and each w / c1 maps to
    its nearest level; dequantize_nf4 gives c1 * codebook[index] back."""
    from autograder.lab02_numerics.formulas import nf4_decode

    w = random_tensor(11, 256, seed=21) * 0.02
    inputs = describe(w=w, block_size=block_size)
    got = student.run(nf4, w, dict(block_size=block_size, double_quant=False), dequantize=True)
    assert "scales" in got, f"quantize_nf4(double_quant=False) on {inputs} must store plain fp32 scales"
    _check_nf4_codes(got, w, block_size, inputs=inputs)
    check_close(got["w_hat"], nf4_decode(got["packed"], got["scales"], block_size), name="dequantize_nf4",
                inputs=inputs)


@pytest.mark.points(2)
def test_dequantize_nf4(student):
    """dequantize_nf4 of codes and scales the grader made: c1 * codebook[index], in the requested dtype; with
    double-quantized scales, c1' = c2 q + mean first."""
    from autograder.lab02_numerics.formulas import double_dequant, nf4_decode, nf4_levels, pack_nibbles

    index = torch.randint(0, 16, (6, 64), generator=torch.Generator().manual_seed(1))
    packed = pack_nibbles(index - 8)
    scales = random_tensor(6, 2, seed=2).abs() * 0.03 + 0.01
    inputs = describe(packed=packed, scales=scales, block_size=32)
    for dtype in (None, "bfloat16"):
        got = student.run(nf4_deq, packed, 32, scales=scales, dtype=dtype)
        assert got.dtype == DTYPES[dtype or "float32"], f"dequantize_nf4(dtype={dtype}) returned {got.dtype}"
        check_close(got, nf4_decode(packed, scales, 32), name=f"dequantize_nf4 (dtype {dtype})", inputs=inputs,
                    dtype=got.dtype)
    double = {"q": torch.randint(-127, 128, (12,), generator=torch.Generator().manual_seed(3), dtype=torch.int8),
              "second": torch.tensor([1e-4, 3e-4, 2e-4]), "mean": torch.tensor(0.02), "block": 5}
    got = student.run(nf4_deq, packed, 32, double=double)
    c1 = double_dequant(double["q"], double["second"], double["mean"], 5).reshape(6, 2)
    want = nf4_levels()[index] * c1.repeat_interleave(32, dim=1)
    check_close(got, want, name="dequantize_nf4 (double-quantized scales, scale blocks of 5)", inputs=inputs)


@pytest.mark.points(2)
@pytest.mark.parametrize("scale_block_size", [None, 100])
def test_double_quantization_bound(student, scale_block_size):
    """Double quantization: mean of the scales, c2 = max|c1 - mean| / 127 per block of 256 (and of 100), the last
    block short; codes nearest, and |c1 - c1'| <= c2 / 2."""
    from autograder.lab02_numerics.formulas import nearest_code_error

    block = scale_block_size or 256
    scales = random_tensor(600, seed=22).abs() * 0.05 + 0.01
    inputs = describe(scales=scales, scale_block_size=block)
    got = student.run(double_q, scales, scale_block_size)
    count = -(-600 // block)
    assert got["q"].dtype == torch.int8 and got["q"].shape == (600,), f"double_quantize codes: {describe(q=got['q'])}"
    assert got["second"].shape == (count,) and got["block"] == block, (
        f"double_quantize on {inputs}: {count} second-level constants expected, got "
        f"{tuple(got['second'].shape)} (scale_block_size {got['block']})")
    mean = scales.double().mean()
    check_close(got["mean"], mean, name="double_quantize mean", inputs=inputs)
    centred = scales.double() - mean
    c2 = torch.stack([centred[i:i + block].abs().max() / 127 for i in range(0, 600, block)])
    check_close(got["second"], c2, name="double_quantize second-level constants c2", inputs=inputs,
                dtype=torch.float32)
    per_scale = c2.repeat_interleave(block)[:600]
    worst = nearest_code_error(got["q"], centred / per_scale)
    assert worst <= 1e-4, f"double_quantize on {inputs}: a code is {worst + 0.5:.3g} levels from (c1 - mean) / c2"
    back = student.run(double_deq, got["q"], got["second"], got["mean"], got["block"])
    error = (back.double() - scales.double()).abs()
    allowed = per_scale / 2 * (1 + 1e-5) + 1e-9
    assert (error <= allowed).all(), f"dequantize_scales: error {error.max().item():.3g} exceeds c2 / 2 " \
                                     f"(largest excess at scale {int((error - allowed).argmax())})"


@pytest.mark.points(1)
def test_dequantize_scales(student):
    """dequantize_scales of codes the grader made: c1' = c2[i // scale_block_size] q[i] + mean (blocks of 7)."""
    from autograder.lab02_numerics.formulas import double_dequant

    q = torch.randint(-127, 128, (30,), generator=torch.Generator().manual_seed(4), dtype=torch.int8)
    second = torch.tensor([1e-3, 2e-3, 5e-4, 4e-3, 3e-3])
    mean = torch.tensor(0.125)
    got = student.run(double_deq, q, second, mean, 7)
    check_close(got, double_dequant(q, second, mean, 7), name="dequantize_scales",
                inputs=describe(q=q, second_scales=second, scale_block_size=7))


@pytest.mark.points(2)
def test_nf4_with_double_quant_round_trip_and_size(student):
    """The QLoRA default (blocks of 64, double quant): 4.127 bits per weight, the same codes as without double quant,
    the scales quantized as double_quantize does, and dequantization error within NF4's plus the scales'."""
    from autograder.lab02_numerics.formulas import double_dequant, double_quant, nf4_decode

    w = random_tensor(64, 256, seed=23) * 0.02
    single = student.run(nf4, w, dict(double_quant=False), dequantize=True)
    double = student.run(nf4, w, None, dequantize=True)
    inputs = describe(w=w, block_size=64)
    bits = 8 * double["nbytes"] / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())) < 1e-9, f"NF4Weight.nbytes: {bits} bits/weight"
    assert "double" in double, "quantize_nf4 with the default config must double-quantize the scales"
    assert torch.equal(single["packed"], double["packed"]), "double quantization must not change the 4-bit codes"
    scales = _check_nf4_codes(single, w, 64, inputs=inputs)
    want = double_quant(scales.float(), 256)
    assert double["double"]["block"] == 256, f"scale blocks of {double['double']['block']}, expected 256"
    assert (double["double"]["q"].long() - want["q"]).abs().max() <= 1, "quantize_nf4's double-quantized codes"
    c1 = double_dequant(double["double"]["q"], double["double"]["second"], double["double"]["mean"], 256)
    check_close(double["block_scales"], c1.reshape(64, 4), name="NF4Weight.block_scales (double quant)",
                inputs=inputs)
    check_close(double["w_hat"], nf4_decode(double["packed"], c1.reshape(64, 4), 64),
                name="dequantize_nf4 (double quant)", inputs=inputs)
    scale_error = (c1.reshape(64, 4) - scales).abs().repeat_interleave(64, dim=1)  # (64, 256)
    difference = (double["w_hat"].double() - single["w_hat"].double()).abs()
    rounding = 2e-7 * double["w_hat"].double().abs() + 1e-9  # both results are rounded to fp32
    assert (difference <= scale_error * (1 + 1e-5) + rounding).all(), \
        "dequantize_nf4 with double quant differs from single by more than the scale error"


@pytest.mark.points(2)
def test_config_fields_reach_the_format(student):
    """Away from the defaults: blocks of 128 with scales double-quantized in blocks of 7 (the last one short), and
    blocks of 32 with blocks of 100 scales; the stored scales are those of double_quantize(c1, scale_block_size)."""
    from autograder.lab02_numerics.formulas import double_dequant, nf4_decode

    for block_size, scale_block_size, N in ((128, 7, 9), (32, 100, 30)):
        w = random_tensor(N, 256, seed=24 + block_size) * 0.05
        inputs = describe(w=w, block_size=block_size, scale_block_size=scale_block_size)
        got = student.run(nf4, w, dict(block_size=block_size, scale_block_size=scale_block_size), dequantize=True)
        scales = _check_nf4_codes(got, w, block_size, inputs=inputs)
        assert "double" in got and got["double"]["block"] == scale_block_size, (
            f"quantize_nf4 on {inputs}: the scales must be double-quantized in blocks of {scale_block_size}")
        S = scales.numel()
        assert got["double"]["q"].shape == (S,) and got["double"]["second"].shape == (-(-S // scale_block_size),), (
            f"quantize_nf4 on {inputs}: {S} scale codes and {-(-S // scale_block_size)} constants expected, got "
            f"{tuple(got['double']['q'].shape)} and {tuple(got['double']['second'].shape)}")
        c1 = double_dequant(got["double"]["q"], got["double"]["second"], got["double"]["mean"], scale_block_size)
        error = (c1 - scales.flatten()).abs()
        c2 = got["double"]["second"].double().repeat_interleave(scale_block_size)[:S]
        assert (error <= c2 / 2 * (1 + 1e-5) + 1e-9).all(), f"double-quantized scales on {inputs} exceed c2 / 2"
        centred = scales.flatten() - scales.mean()
        expected_c2 = torch.stack([centred[i:i + scale_block_size].abs().max() / 127
                                   for i in range(0, S, scale_block_size)])
        check_close(got["double"]["second"], expected_c2, name="second-level constants", inputs=inputs,
                    dtype=torch.float32)
        check_close(got["w_hat"], nf4_decode(got["packed"], c1.reshape(N, -1), block_size), name="dequantize_nf4",
                    inputs=inputs)


@pytest.mark.points(2)
def test_zero_blocks_stay_finite(student):
    """An all-zero block (and a zero row) gets a finite scale, the zero level (index 7) and comes back as zeros, with
    and without double quantization; scales that are all equal double-quantize to finite codes and come back."""
    w = random_tensor(6, 128, seed=25) * 0.02
    w[2, 32:64] = 0.0
    w[4] = 0.0
    for double_quant in (False, True):
        got = student.run(nf4, w, dict(block_size=32, double_quant=double_quant), dequantize=True)
        name = f"quantize_nf4 (zero block, double_quant={double_quant})"
        assert torch.isfinite(got["block_scales"]).all() and torch.isfinite(got["w_hat"]).all(), \
            f"{name}: non-finite scales or weights"
        assert (got["packed"][2, 16:32] == 0x77).all() and (got["packed"][4] == 0x77).all(), \
            f"{name}: zeros must get the zero level, index 7 (byte 0x77)"
        assert torch.equal(got["w_hat"][4], torch.zeros(128)) and torch.equal(got["w_hat"][2, 32:64], torch.zeros(32)), \
            f"{name}: zeros must come back exactly"
    flat = torch.full((10,), 0.04)
    got = student.run(double_q, flat, 4)
    assert all(torch.isfinite(got[k].double()).all() for k in ("q", "second", "mean")), \
        "double_quantize of equal scales: non-finite codes or constants"
    back = student.run(double_deq, got["q"], got["second"], got["mean"], got["block"])
    check_close(back, flat.double(), name="dequantize_scales(double_quantize(equal scales))",
                inputs=describe(scales=flat), rtol=1e-6)


@pytest.mark.points(1)
def test_bad_input_is_refused(student):
    """A block size that does not divide K, an odd K, an integer weight and 2-D scales are refused."""
    with pytest.raises(ValueError, match="must divide K"):
        student.run(nf4_error, random_tensor(4, 96, seed=24), None, dict(block_size=64))
    with pytest.raises(ValueError, match="even"):
        student.run(nf4_error, random_tensor(4, 33, seed=25), None, dict(block_size=2))
    with pytest.raises(TypeError, match="dtype"):
        student.run(nf4_error, torch.ones(4, 64), "int8")
    with pytest.raises(ValueError, match="1-D"):
        student.run(double_error, torch.ones(4, 4))
