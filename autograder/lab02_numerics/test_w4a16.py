"""Lab 02, part 4: the Triton W4A16 kernel (w4a16.py) against dequantize-then-matmul in float64: in the interpreter
on CPU, compiled (on CUDA tensors) where there is a GPU.

The grader quantizes the weights itself (formulas.py) and hands the producer the packed codes and scales, so these
tests grade the kernel alone; the expected output is x W'^T in float64, with W' decoded here.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def make_weight(kind: str, N: int, K: int, group_size: int, *, seed: int, scale: float = 0.05) -> dict:
    """A random (N, K) weight quantized by the grader: {"kind", "packed", "scales", "group_size", "shape"}."""
    from autograder.lab02_numerics import formulas as f

    w = random_tensor(N, K, seed=seed) * scale
    if kind == "int4":
        codes, scales = f.int4_encode(w, group_size)
    else:
        index, scales = f.nf4_encode(w, group_size)
        codes = index - 8
    return {"kind": kind, "packed": f.pack_nibbles(codes), "scales": scales, "group_size": group_size,
            "shape": (N, K)}


def expected_output(x: torch.Tensor, weight: dict) -> torch.Tensor:
    """x W'^T in float64."""
    from autograder.lab02_numerics import formulas as f

    decode = f.int4_decode if weight["kind"] == "int4" else f.nf4_decode
    w_hat = decode(weight["packed"], weight["scales"], weight["group_size"])
    return x.double() @ w_hat.t()


# -----------------------------------------------------------------------------
# Producers: run in the worker


def _device() -> torch.device:
    """Where the kernel runs: compiled on a GPU when there is one, else the interpreter on CPU tensors."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def own_kernel_only() -> None:
    """The reference's fast path ships with the lab (w4a16_gemv.py, to read): it must not stand in for the graded
    kernel. Its kernel object refuses to launch while a graded producer runs (every reference to it sees this)."""
    import lab02_numerics.w4a16  # noqa: F401  (the student's module first, whatever it imports)

    try:
        from lab02_numerics import w4a16_gemv
    except ImportError:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("w4a16_matmul must launch your own kernel, not the reference fast path (w4a16_gemv.py)")

    w4a16_gemv.w4a16_gemv_kernel.run = refuse


def build_weight(weight: dict, device: torch.device, *, double: dict | None = None):
    """An Int4Weight or NF4Weight from the grader's plain tensors (optionally with double-quantized NF4 scales)."""
    from lab02_numerics.nf4 import NF4Weight, QuantizedScales
    from lab02_numerics.quantize import Int4Weight

    packed, scales = weight["packed"].to(device), weight["scales"].to(device)
    if weight["kind"] == "int4":
        return Int4Weight(packed=packed, scales=scales, group_size=weight["group_size"], shape=weight["shape"])
    if double is not None:
        scales = QuantizedScales(q=double["q"].to(device), second_scales=double["second"].to(device),
                                 mean=double["mean"].to(device), scale_block_size=double["block"])
    return NF4Weight(packed=packed, scales=scales, block_size=weight["group_size"], shape=weight["shape"])


def w4a16(x: torch.Tensor, weight: dict, config: dict | None = None, *, x_dtype: str = "float32",
          transposed: bool = False, double: dict | None = None) -> dict:
    """w4a16_matmul(x, weight, config=W4A16Config(**config)); x given (K, M) and transposed when `transposed`."""
    from lab02_numerics.w4a16 import W4A16Config, w4a16_matmul

    own_kernel_only()
    device = _device()
    x = x.to(device=device, dtype=DTYPES[x_dtype])
    if transposed:
        x = x.t()  # (M, K) with strides (1, M): not contiguous
    qw = build_weight(weight, device, double=double)
    y = w4a16_matmul(x, qw) if config is None else w4a16_matmul(x, qw, config=W4A16Config(**config))
    return {"y": y.float().cpu(), "dtype": str(y.dtype), "shape": tuple(y.shape)}


def w4a16_error(x: torch.Tensor, weight: dict | None, config: dict | None = None, *, x_dtype: str = "float32",
                meta_x: bool = False) -> None:
    from lab02_numerics.w4a16 import W4A16Config, w4a16_matmul

    device = _device()
    qw = build_weight(weight, device) if weight is not None else x
    x = torch.empty(x.shape, device="meta") if meta_x else x.to(device=device, dtype=DTYPES[x_dtype])
    w4a16_matmul(x, qw, config=None if config is None else W4A16Config(**config))


# -----------------------------------------------------------------------------
# Tests: run in the grader


def check_output(got: dict, x: torch.Tensor, weight: dict, *, name: str, x_dtype: str = "float32") -> None:
    """Shape and dtype, then fp32 tolerance (bf16/fp16 when x is 16-bit; the kernel multiplies x as given)."""
    x_used = x.to(DTYPES[x_dtype])
    expected = expected_output(x_used, weight)
    M, N = x.shape[0], weight["shape"][0]
    assert got["shape"] == (M, N) and got["dtype"] == str(DTYPES[x_dtype]), (
        f"{name}: expected a ({M}, {N}) {DTYPES[x_dtype]} result, got {got['shape']} {got['dtype']}")
    K = x.shape[1]
    dtype = torch.float32 if x_dtype == "float32" else DTYPES[x_dtype]
    # atol grows with sqrt(K) |x| |W'|, the size of fp32 accumulation error over K terms (or the 16-bit output rounding)
    atol = (1e-6 * K ** 0.5 if x_dtype == "float32" else 1e-2) * float(expected.abs().max())
    check_close(got["y"], expected, name=name, inputs=describe(x=x_used, N=N, group_size=weight["group_size"]),
                dtype=dtype, atol=atol)


@pytest.mark.points(4)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("M, N, K, group_size", [(1, 45, 256, 64), (7, 33, 128, 32), (19, 50, 256, 128)])
def test_int4_matches_reference(student, M, N, K, group_size):
    """Group-wise int4, ragged M and N (masks), one and several M tiles, against float64 dequantize-then-matmul."""
    x = random_tensor(M, K, seed=31)
    weight = make_weight("int4", N, K, group_size, seed=32)
    check_output(student.run(w4a16, x, weight), x, weight, name="w4a16_matmul (int4)")


@pytest.mark.points(3)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("M, N", [(3, 37), (16, 24)])
def test_nf4_matches_reference(student, M, N):
    """NF4 (blocks of 64) with double-quantized scales (QLoRA's format, dequantized by the launcher first)."""
    from autograder.lab02_numerics import formulas as f

    x = random_tensor(M, 192, seed=33)
    weight = make_weight("nf4", N, 192, 64, seed=34, scale=0.02)
    stored = f.double_quant(weight["scales"], 256)
    double = {"q": stored["q"].to(torch.int8), "second": stored["second"], "mean": stored["mean"], "block": 256}
    c1 = f.double_dequant(stored["q"], stored["second"], stored["mean"], 256).reshape(weight["scales"].shape)
    got = student.run(w4a16, x, weight, double=double)
    check_output(got, x, dict(weight, scales=c1), name="w4a16_matmul (nf4, double-quantized scales)")


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_tiles_split_k_and_strides(student):
    """Several groups per K step, split-K partial sums, and a non-contiguous x all give the same answer."""
    x = random_tensor(512, 5, seed=35)  # given (K, M): the producer transposes it
    weight = make_weight("int4", 40, 512, 32, seed=36, scale=1.0)
    config = dict(block_m=16, block_n=32, block_k=128, split_k=2, num_stages=1)
    got = student.run(w4a16, x, weight, config, transposed=True)
    check_output(got, x.t(), weight, name=f"w4a16_matmul ({config})")


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("split_k, block_k, group_size", [(4, 64, 64), (2, 128, 128)])
def test_split_k_partial_sums(student, split_k, block_k, group_size):
    """Split-K on its own (one group per K step): 4 or 2 programs share each output tile (3 K steps each), with
    several N tiles."""
    x = random_tensor(6, 768, seed=37)
    weight = make_weight("int4", 70, 768, group_size, seed=38)
    config = dict(block_m=16, block_n=16, block_k=block_k, split_k=split_k, num_stages=1)
    check_output(student.run(w4a16, x, weight, config), x, weight, name=f"w4a16_matmul (split_k={split_k})")


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("kind, group_size, block_k", [("int4", 32, 128), ("nf4", 32, 64)])
def test_several_groups_per_k_step(student, kind, group_size, block_k):
    """block_k a multiple of the group size (4 and 2 groups per K step, no split-K), int4 and NF4 (plain scales):
    each group's scale applied to its own columns only."""
    x = random_tensor(3, 256, seed=39)
    weight = make_weight(kind, 20, 256, group_size, seed=40)
    config = dict(block_m=16, block_n=16, block_k=block_k, split_k=1, num_stages=1)
    check_output(student.run(w4a16, x, weight, config), x, weight,
                 name=f"w4a16_matmul ({kind}, {block_k // group_size} groups per K step)")


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("x_dtype, split_k", [("bfloat16", 1), ("float16", 2)])
def test_16_bit_activations(student, x_dtype, split_k):
    """bf16 and fp16 activations: the result has x's dtype (with and without split-K partial sums) and matches
    float64 at 16-bit tolerance; wider tiles (block_m 32, block_n 64)."""
    x = random_tensor(9, 256, seed=41)
    weight = make_weight("int4", 70, 256, 64, seed=42)
    config = dict(block_m=32, block_n=64, block_k=64, split_k=split_k, num_stages=1)
    check_output(student.run(w4a16, x, weight, config, x_dtype=x_dtype), x, weight, x_dtype=x_dtype,
                 name=f"w4a16_matmul ({x_dtype} activations, split_k={split_k})")


@pytest.mark.points(2)
def test_bad_input_is_refused(student):
    """A weight that is not Int4Weight/NF4Weight, an unsupported activation dtype, x not 2-D, mismatched K, x on
    another device, a group size the kernel cannot tile, a block_k that is not a multiple of the group size, and a
    block_k * split_k that does not divide K."""
    weight = make_weight("int4", 16, 128, 64, seed=37)
    with pytest.raises(TypeError, match="Int4Weight"):
        student.run(w4a16_error, random_tensor(16, 128, seed=38), None)
    with pytest.raises(TypeError, match="dtype"):
        student.run(w4a16_error, random_tensor(2, 128, seed=38), weight, x_dtype="float64")
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        student.run(w4a16_error, random_tensor(2, 1, 128, seed=39), weight)
    with pytest.raises(ValueError, match="K"):
        student.run(w4a16_error, random_tensor(2, 96, seed=39), weight)
    with pytest.raises(ValueError, match="is on"):
        student.run(w4a16_error, random_tensor(2, 128, seed=39), weight, meta_x=True)
    with pytest.raises(ValueError, match="multiple of group_size"):
        student.run(w4a16_error, random_tensor(2, 128, seed=40), weight, dict(block_k=32))
    with pytest.raises(ValueError, match="must divide K"):
        student.run(w4a16_error, random_tensor(2, 128, seed=40), weight, dict(block_k=64, split_k=4))
    for group_size in (48, 16):
        with pytest.raises(ValueError, match="power of two"):
            student.run(w4a16_error, random_tensor(2, 96, seed=41), make_weight("int4", 8, 96, group_size, seed=42))
