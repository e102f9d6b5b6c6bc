"""Lab 02, part 3a: int8 absmax and zero-point, int4 packing and group-wise int4 (quantize.py).

Expectations come from formulas.py (the docstring's equations, in float64); dequantizers are fed codes and scales
the grader made, so each function is checked on its own.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "int32": torch.int32, "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8}
SLACK = 1e-5  # float32 rounding of x / s and s * q, relative to the scale


def degenerate_rows(x: torch.Tensor) -> torch.Tensor:
    """x with row 0 all zeros and row 1 constant (a zero range): the scale floors must keep them finite."""
    x = x.clone()
    x[0] = 0.0
    x[1] = 0.37
    return x


# -----------------------------------------------------------------------------
# Producers: run in the worker


def absmax(x: torch.Tensor, per_channel: bool) -> dict:
    from lab02_numerics.quantize import absmax_quantize

    q, scale = absmax_quantize(x, per_channel=per_channel)
    return {"q": q, "scale": scale}


def absmax_deq(q: torch.Tensor, scale: torch.Tensor, dtype: str | None = None) -> torch.Tensor:
    from lab02_numerics.quantize import absmax_dequantize

    return absmax_dequantize(q, scale) if dtype is None else absmax_dequantize(q, scale, dtype=DTYPES[dtype])


def zeropoint(x: torch.Tensor, per_channel: bool) -> dict:
    from lab02_numerics.quantize import zeropoint_quantize

    q, scale, zero_point = zeropoint_quantize(x, per_channel=per_channel)
    return {"q": q, "scale": scale, "zero_point": zero_point}


def zeropoint_deq(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: str | None = None):
    from lab02_numerics.quantize import zeropoint_dequantize

    if dtype is None:
        return zeropoint_dequantize(q, scale, zero_point)
    return zeropoint_dequantize(q, scale, zero_point, dtype=DTYPES[dtype])


def pack(q: torch.Tensor) -> torch.Tensor:
    from lab02_numerics.quantize import pack_int4

    return pack_int4(q)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    from lab02_numerics.quantize import unpack_int4

    return unpack_int4(packed)


def int4(w: torch.Tensor, group_size: int | None) -> dict:
    from lab02_numerics.quantize import int4_quantize

    qw = int4_quantize(w) if group_size is None else int4_quantize(w, group_size=group_size)
    return {"packed": qw.packed, "scales": qw.scales, "group_size": qw.group_size, "shape": tuple(qw.shape)}


def int4_deq(packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: str | None = None) -> torch.Tensor:
    from lab02_numerics.quantize import Int4Weight, int4_dequantize

    N = packed.shape[0]
    qw = Int4Weight(packed=packed, scales=scales, group_size=group_size, shape=(N, 2 * packed.shape[1]))
    return int4_dequantize(qw) if dtype is None else int4_dequantize(qw, dtype=DTYPES[dtype])


def refused(function: str, x: torch.Tensor, dtype: str | None = None, **kwargs) -> None:
    """Call a quantize.py function on bad input (the test expects an exception)."""
    from lab02_numerics import quantize

    quantize.__dict__[function](x if dtype is None else x.to(DTYPES[dtype]), **kwargs)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _check_bound(x, x_hat, half_step, *, name, inputs, relative=0.0):
    """|x - x_hat| <= half_step (broadcast) everywhere, with float32 slack (and `relative` * |x|)."""
    assert torch.isfinite(x_hat).all(), f"{name} on input {inputs}: non-finite values (is a zero range divided by?)"
    error = (x.double() - x_hat.double()).abs()
    allowed = half_step.double() * (1 + SLACK) + 1e-7 + relative * x.double().abs()
    excess = error - allowed
    if (excess > 0).any():
        index = [int(i) for i in torch.unravel_index(excess.argmax(), excess.shape)]
        raise AssertionError(f"{name} on input {inputs}: error {error[tuple(index)].item():.4g} at index {index} "
                             f"exceeds the bound scale / 2 = {allowed.expand_as(error)[tuple(index)].item():.4g}")


def _check_codes(got, x, scale, *, offset=0.0, low, high, name, inputs):
    """int8 codes in [low, high], each the nearest level of x / s + offset (ties either way)."""
    assert got.dtype == torch.int8 and got.shape == x.shape, \
        f"{name} on input {inputs}: expected int8 codes of shape {tuple(x.shape)}, got {got.dtype} {tuple(got.shape)}"
    from autograder.lab02_numerics.formulas import nearest_code_error

    exact = (x.double() / scale + offset).clamp(low, high)
    worst = nearest_code_error(got, exact)
    assert worst <= 1e-4, (f"{name} on input {inputs}: a code is {worst + 0.5:.3g} levels from x / s"
                           f"{' + z' if isinstance(offset, torch.Tensor) else ''}; rounding to the nearest level "
                           "keeps it within 0.5")
    assert int(got.min()) >= low and int(got.max()) <= high, f"{name}: codes outside [{low}, {high}]"


@pytest.mark.points(3)
@pytest.mark.parametrize("per_channel", [False, True])
def test_absmax_error_bound(student, per_channel):
    """Symmetric int8: s = max|x| / 127 (per tensor or per row), q = round(x / s) in [-127, 127], and
    |x - deq(q(x))| <= s / 2."""
    from autograder.lab02_numerics.formulas import absmax_scale

    x = random_tensor(37, 53, seed=11) * torch.linspace(0.1, 3.0, 37)[:, None]  # rows of very different ranges
    got = student.run(absmax, x, per_channel)
    inputs = describe(x=x, per_channel=per_channel)
    scale = absmax_scale(x, per_channel=per_channel)
    assert got["scale"].shape == scale.shape, f"absmax_quantize scale shape {tuple(got['scale'].shape)}, expected " \
                                              f"{tuple(scale.shape)}"
    assert got["scale"].dtype == torch.float32, f"absmax_quantize scale must be fp32, got {got['scale'].dtype}"
    check_close(got["scale"], scale, name="absmax_quantize scale (max|x| / 127)", inputs=inputs, rtol=1e-6)
    _check_codes(got["q"], x, scale, low=-127, high=127, name="absmax_quantize codes", inputs=inputs)
    assert int(got["q"].abs().max()) == 127, "the largest |x| must map to +-127"
    x_hat = student.run(absmax_deq, got["q"], got["scale"])
    _check_bound(x, x_hat, scale / 2, name="absmax_dequantize(absmax_quantize(x))", inputs=inputs)


@pytest.mark.points(1)
@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
def test_per_tensor_takes_any_shape(student, scheme):
    """Per tensor, the weight may have any shape (a 1-D bias, a 3-D stack): one scalar scale, the bound holds; only
    per-channel needs (N, K)."""
    from autograder.lab02_numerics.formulas import absmax_scale, zeropoint_scale

    for x in (random_tensor(3, 5, 7, seed=19), random_tensor(11, seed=20)):
        inputs = describe(x=x, per_channel=False)
        if scheme == "absmax":
            got = student.run(absmax, x, False)
            scale = absmax_scale(x, per_channel=False)
            x_hat = student.run(absmax_deq, got["q"], got["scale"])
        else:
            got = student.run(zeropoint, x, False)
            scale, _ = zeropoint_scale(x, per_channel=False)
            x_hat = student.run(zeropoint_deq, got["q"], got["scale"], got["zero_point"])
        assert got["q"].shape == x.shape and got["scale"].dim() == 0, \
            f"{scheme} per tensor on {inputs}: codes {tuple(got['q'].shape)}, scale shape {tuple(got['scale'].shape)}"
        check_close(got["scale"], scale, name=f"{scheme} per-tensor scale", inputs=inputs, rtol=1e-5)
        _check_bound(x, x_hat, scale / 2, name=f"{scheme} per tensor", inputs=inputs)


@pytest.mark.points(2)
def test_absmax_dequantize(student):
    """absmax_dequantize(q, s) = s q, in the requested dtype (fp32 by default), with per-row and per-tensor scales."""
    q = torch.randint(-127, 128, (6, 9), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    for scale in (random_tensor(6, 1, seed=2).abs() + 0.01, torch.tensor(0.0375)):
        for dtype in (None, "bfloat16", "float64"):
            got = student.run(absmax_deq, q, scale, dtype)
            want = q.double() * scale.double()
            expected_dtype = DTYPES[dtype or "float32"]
            assert got.dtype == expected_dtype, f"absmax_dequantize(dtype={dtype}) returned {got.dtype}"
            check_close(got, want, name=f"absmax_dequantize (dtype {dtype})", inputs=describe(q=q, scale=scale),
                        dtype="float32" if expected_dtype == torch.float64 else expected_dtype)


@pytest.mark.points(2)
def test_per_channel_beats_per_tensor_with_outlier_row(student):
    """One outlier row coarsens the per-tensor grid for every row; per-channel scales keep the others fine."""
    x = random_tensor(16, 64, seed=12)
    x[3] *= 100.0
    errors = {}
    for per_channel in (False, True):
        got = student.run(absmax, x, per_channel)
        errors[per_channel] = (got["q"].double() * got["scale"].double() - x.double()).pow(2).mean().sqrt().item()
    assert errors[True] < 0.5 * errors[False], f"RMS error per channel {errors[True]:.3g} vs per tensor " \
                                               f"{errors[False]:.3g}: per channel should be far smaller"


@pytest.mark.points(2)
@pytest.mark.parametrize("per_channel", [False, True])
def test_zeropoint_error_bound(student, per_channel):
    """Asymmetric int8 on one-sided data: s = (max - min) / 255, z = -128 - round(min / s), all 256 levels used (min
    -> -128, max -> 127), |error| <= s / 2."""
    from autograder.lab02_numerics.formulas import zeropoint_scale

    x = random_tensor(21, 45, seed=13).abs() + 0.5  # strictly positive: absmax would waste the negative half
    got = student.run(zeropoint, x, per_channel)
    inputs = describe(x=x, per_channel=per_channel)
    scale, low = zeropoint_scale(x, per_channel=per_channel)
    check_close(got["scale"], scale, name="zeropoint_quantize scale ((max - min) / 255)", inputs=inputs, rtol=1e-5)
    assert got["zero_point"].shape == scale.shape, f"zero_point shape {tuple(got['zero_point'].shape)}, expected " \
                                                   f"{tuple(scale.shape)}"
    zero = -128.0 - torch.round(low / scale)
    tie = ((low / scale) % 1.0 - 0.5).abs() < 1e-3  # min / s this close to n + 1/2 may round either way
    wrong = ((got["zero_point"].double() - zero).abs() > 0) & ~tie.expand_as(zero)
    assert not wrong.any() and (got["zero_point"].double() - zero).abs().max() <= 1, (
        f"zeropoint_quantize on {inputs}: zero point {got['zero_point'].flatten()[:4].tolist()}..., expected "
        f"-128 - round(min / s) = {zero.flatten()[:4].tolist()}...")
    assert torch.equal(got["zero_point"].double(), torch.round(got["zero_point"].double())), \
        "the zero point must be integer-valued"
    _check_codes(got["q"], x, scale, offset=got["zero_point"].double(), low=-128, high=127,
                 name="zeropoint_quantize codes", inputs=inputs)
    assert int(got["q"].min()) == -128 and int(got["q"].max()) == 127, (
        f"zeropoint_quantize on {inputs}: codes span [{int(got['q'].min())}, {int(got['q'].max())}], expected "
        "[-128, 127]")
    x_hat = student.run(zeropoint_deq, got["q"], got["scale"], got["zero_point"])
    _check_bound(x, x_hat, scale / 2, name="zeropoint_dequantize(zeropoint_quantize(x))", inputs=inputs)


@pytest.mark.points(1)
def test_zeropoint_dequantize(student):
    """zeropoint_dequantize(q, s, z) = s (q - z), per row and per tensor, in the requested dtype."""
    q = torch.randint(-128, 128, (5, 7), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    for scale, zero in ((random_tensor(5, 1, seed=4).abs() + 0.01, torch.tensor([[-3.0], [17.0], [0.0], [-128.0],
                                                                                 [90.0]])),
                        (torch.tensor(0.02), torch.tensor(-41.0))):
        for dtype in (None, "bfloat16"):
            got = student.run(zeropoint_deq, q, scale, zero, dtype)
            assert got.dtype == DTYPES[dtype or "float32"], f"zeropoint_dequantize(dtype={dtype}) returned {got.dtype}"
            check_close(got, (q.double() - zero.double()) * scale.double(), name="zeropoint_dequantize",
                        inputs=describe(q=q, scale=scale, zero_point=zero), dtype=got.dtype)


@pytest.mark.points(2)
@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
def test_zero_and_constant_rows_stay_finite(student, scheme):
    """A row of zeros (and, for the zero point, a constant row: a zero range) must not divide by zero: codes and
    dequantized values are finite, zeros come back exactly zero, and the error stays within the returned s / 2."""
    x = degenerate_rows(random_tensor(4, 24, seed=14))
    inputs = describe(x=x, rows="0: zeros, 1: constant 0.37")
    for per_channel in (True, False):
        if scheme == "absmax":
            got = student.run(absmax, x if per_channel else torch.zeros(3, 8), per_channel)
            x_hat = student.run(absmax_deq, got["q"], got["scale"])
        else:
            got = student.run(zeropoint, x if per_channel else torch.full((3, 8), -1.25), per_channel)
            x_hat = student.run(zeropoint_deq, got["q"], got["scale"], got["zero_point"])
        source = x if per_channel else (torch.zeros(3, 8) if scheme == "absmax" else torch.full((3, 8), -1.25))
        name = f"{scheme} (per_channel={per_channel}) on {'degenerate rows' if per_channel else 'a constant tensor'}"
        assert all(torch.isfinite(t.double()).all() for t in got.values()), f"{name}: non-finite scale or code"
        assert torch.isfinite(x_hat).all(), f"{name}: dequantized values are not finite"
        if per_channel:
            assert torch.equal(x_hat[0], torch.zeros_like(x_hat[0])), f"{name}: a zero row must come back as zeros"
        else:
            assert got["scale"].double().abs().max() > 0, f"{name}: the scale must stay positive"
        # fp32 keeps ~7 digits of a constant row however tiny its floored scale: allow that rounding too
        _check_bound(source, x_hat, got["scale"].double().abs() / 2, name=name, inputs=inputs, relative=1e-6)


@pytest.mark.points(2)
def test_pack_unpack_round_trip(student):
    """pack_int4 puts column 2j in the low nibble of byte j and 2j + 1 in the high one (as q + 8); unpack inverts it,
    on 1-D, 2-D and 3-D tensors and on an empty one."""
    from autograder.lab02_numerics.formulas import pack_nibbles

    q = torch.randint(-8, 8, (13, 46), generator=torch.Generator().manual_seed(14), dtype=torch.int8)
    packed = student.run(pack, q)
    assert packed.dtype == torch.uint8 and packed.shape == (13, 23), \
        f"pack_int4 of {describe(q=q)} must give uint8 (13, 23), got {packed.dtype} {tuple(packed.shape)}"
    assert torch.equal(packed, pack_nibbles(q)), "pack_int4: byte j must be (q[2j] + 8) | (q[2j + 1] + 8) << 4"
    assert torch.equal(student.run(unpack, pack_nibbles(q)), q), "unpack_int4(pack_int4(q)) must return q exactly"
    every_code = torch.arange(-8, 8, dtype=torch.int8)
    for codes in (every_code, every_code.reshape(2, 2, 4), torch.zeros(0, 4, dtype=torch.int8)):
        packed = student.run(pack, codes)
        assert torch.equal(packed, pack_nibbles(codes)), f"pack_int4 of {describe(q=codes)}"
        back = student.run(unpack, pack_nibbles(codes))
        assert back.dtype == torch.int8 and torch.equal(back, codes), f"unpack_int4 of {describe(q=codes)}"


@pytest.mark.points(2)
@pytest.mark.parametrize("group_size", [32, None])
def test_int4_group_error_bound(student, group_size):
    """Group-wise int4: one scale s = max|w| / 7 per group of P along K (P = 32, and the default 64), codes the
    nearest levels in [-8, 7] packed as pack_int4 does, and |w - deq(q(w))| <= s / 2."""
    from autograder.lab02_numerics.formulas import int4_decode, unpack_nibbles

    P = group_size or 64
    w = random_tensor(19, 192, seed=15) * torch.linspace(0.2, 2.0, 192)  # ranges that differ from group to group
    got = student.run(int4, w, group_size)
    inputs = describe(w=w, group_size=group_size)
    assert got["packed"].dtype == torch.uint8 and got["packed"].shape == (19, 96), \
        f"int4_quantize on {inputs}: packed {got['packed'].dtype} {tuple(got['packed'].shape)}"
    assert got["scales"].shape == (19, 192 // P) and got["group_size"] == P and got["shape"] == (19, 192), \
        f"int4_quantize on {inputs}: scales {tuple(got['scales'].shape)}, group_size {got['group_size']}"
    scales = w.double().reshape(19, 192 // P, P).abs().amax(dim=-1) / 7
    check_close(got["scales"], scales, name="int4_quantize scales (max|w| / 7 per group)", inputs=inputs, rtol=1e-6)
    per_column = scales.repeat_interleave(P, dim=1)
    codes = unpack_nibbles(got["packed"])
    _check_codes(codes.to(torch.int8), w, per_column, low=-8, high=7, name="int4_quantize codes (unpacked)",
                 inputs=inputs)
    x_hat = student.run(int4_deq, got["packed"], got["scales"], P)
    _check_bound(w, x_hat, per_column / 2, name="int4_dequantize(int4_quantize(w))", inputs=inputs)
    check_close(x_hat, int4_decode(got["packed"], got["scales"], P), name="int4_dequantize", inputs=inputs)


@pytest.mark.points(2)
def test_int4_dequantize_and_zero_groups(student):
    """int4_dequantize(packed, scales) = s_g q in the requested dtype (several group sizes); a group of zeros gets
    finite scales, code 0 and comes back exactly zero."""
    from autograder.lab02_numerics.formulas import int4_decode, pack_nibbles

    codes = torch.randint(-8, 8, (5, 48), generator=torch.Generator().manual_seed(16))
    packed = pack_nibbles(codes)
    for P in (8, 16, 48):
        scales = random_tensor(5, 48 // P, seed=P).abs() + 0.05
        for dtype in (None, "bfloat16"):
            got = student.run(int4_deq, packed, scales, P, dtype)
            assert got.dtype == DTYPES[dtype or "float32"], f"int4_dequantize(dtype={dtype}) returned {got.dtype}"
            check_close(got, int4_decode(packed, scales, P), name=f"int4_dequantize (group {P}, dtype {dtype})",
                        inputs=describe(packed=packed, scales=scales), dtype=got.dtype)
    w = random_tensor(4, 64, seed=17)
    w[1, 16:32] = 0.0  # one zero group
    w[2] = 0.0  # a zero row
    got = student.run(int4, w, 16)
    assert torch.isfinite(got["scales"]).all(), "int4_quantize: a group of zeros gave a non-finite scale"
    assert (got["packed"][1, 8:16] == 0x88).all() and (got["packed"][2] == 0x88).all(), \
        "int4_quantize: zeros must get code 0 (stored as 8 | 8 << 4 = 0x88)"
    x_hat = student.run(int4_deq, got["packed"], got["scales"], 16)
    assert torch.equal(x_hat[2], torch.zeros(64)) and torch.equal(x_hat[1, 16:32], torch.zeros(16)), \
        "int4_dequantize(int4_quantize(w)) must give zeros back exactly"


@pytest.mark.points(2)
def test_bad_input_is_refused(student):
    """A group size that does not divide K, an odd K, codes outside [-8, 7], and unsupported dtypes each get a clear
    error (ValueError or TypeError, as documented)."""
    w = random_tensor(8, 96, seed=16)
    with pytest.raises(ValueError, match="must divide K"):
        student.run(refused, "int4_quantize", w, group_size=64)
    with pytest.raises(ValueError, match="even"):
        student.run(refused, "int4_quantize", random_tensor(8, 33, seed=17), group_size=33)
    with pytest.raises(ValueError, match="even"):
        student.run(refused, "pack_int4", torch.zeros(4, 7, dtype=torch.int8))
    for bad in (8, -9):
        with pytest.raises(ValueError, match=r"\[-8, 7\]"):
            student.run(refused, "pack_int4", torch.full((2, 4), bad, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        student.run(refused, "pack_int4", torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="uint8"):
        student.run(refused, "unpack_int4", torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="dtype"):
        student.run(refused, "int4_quantize", w, "int32", group_size=32)
    with pytest.raises(TypeError, match="dtype"):
        student.run(refused, "absmax_quantize", w, "int64", per_channel=True)
    with pytest.raises(TypeError, match="dtype"):
        student.run(refused, "zeropoint_quantize", w, "int32", per_channel=False)
    for function in ("absmax_quantize", "zeropoint_quantize"):
        with pytest.raises(ValueError, match="2-D"):
            student.run(refused, function, random_tensor(2, 3, 4, seed=18), per_channel=True)
