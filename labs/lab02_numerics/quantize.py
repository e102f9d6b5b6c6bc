"""Integer quantization of weights: absmax int8, zero-point int8, and group-wise int4 packed two to a byte.

What it saves: bytes. A weight stored in int8 takes 1 byte instead of 2 (bf16) or 4 (fp32); int4 takes half a byte
plus one scale per group. Decoding reads every weight once per token, so fewer bytes is proportionally less time
(w4a16.py). Dettmers et al. 2022 (LLM.int8(), arXiv:2208.07339, Section 2) give the two int8 schemes:

    absmax (symmetric)     s = max|x| / 127,               q = round(x / s) in [-127, 127],    x' = s q
    zero-point (affine)    s = (max x - min x) / 255,      z = -128 - round(min x / s),
                           q = clamp(round(x / s) + z, -128, 127),                          x' = s (q - z)

Rounding to the nearest level bounds the error by half a step: |x - x'| <= s / 2. The statistics (max, min) are taken
over the whole tensor ("per tensor"), or over each output channel, the rows of a (N, K) nn.Linear weight ("per
channel"), which keeps one outlier row from coarsening every other row's grid.

Group-wise int4 (as GPTQ/AWQ store weights, Frantar et al. 2022, arXiv:2210.17323): each row is cut into groups of P
consecutive inputs, each with its own absmax scale s = max|x| / 7 and q = clamp(round(x / s), -8, 7). Two 4-bit values
share one byte, the even column in the low nibble and the odd column in the high nibble, each stored as q + 8 in 0..15:

    packed[n, j] = (q[n, 2j] + 8) | (q[n, 2j + 1] + 8) << 4                      (N, K) int8 -> (N, K / 2) uint8

Usage:
    q, scale = absmax_quantize(w, per_channel=True);   w_hat = absmax_dequantize(q, scale)
    qw = int4_quantize(w, group_size=64);              w_hat = int4_dequantize(qw)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# a row of zeros would give s = 0 and 0 / 0 = NaN; any positive floor keeps q = 0 exact for it
MIN_SCALE = 1e-12

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class Int4Weight:
    """A (N, K) weight in group-wise int4.

    Attributes:
        packed: (N, K / 2) uint8, two 4-bit codes per byte (even column in the low nibble).
        scales: (N, K / P) fp32, one absmax scale per group of P consecutive columns.
        group_size: P.
        shape: (N, K) of the original weight.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        N, K = self.shape
        if self.packed.dtype != torch.uint8 or tuple(self.packed.shape) != (N, K // 2):
            raise ValueError(f"packed must be uint8 of shape {(N, K // 2)}, got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        if tuple(self.scales.shape) != (N, K // self.group_size):
            raise ValueError(f"scales must have shape {(N, K // self.group_size)}, got {tuple(self.scales.shape)}")

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()


# -----------------------------------------------------------------------------
# Input checks (shared by every scheme)


def check_weight(x: torch.Tensor, *, what: str) -> None:
    """Raise TypeError unless `x` is a floating-point tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: unsupported dtype {x.dtype}; expected one of {FLOAT_DTYPES}")


def check_groups(x: torch.Tensor, group_size: int, *, what: str) -> None:
    """Raise ValueError unless `x` is (N, K) with K even and `group_size` a positive even divisor of K."""
    if x.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D (N, K) weight, got shape {tuple(x.shape)}")
    K = x.shape[1]
    if K % 2:
        raise ValueError(f"{what}: K ({K}) must be even to pack two 4-bit values per byte")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"{what}: group_size ({group_size}) must be a positive even number")
    if K % group_size:
        raise ValueError(f"{what}: group_size ({group_size}) must divide K ({K})")


# -----------------------------------------------------------------------------
# int8: absmax and zero-point


def absmax_quantize(x: torch.Tensor, *, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: s = max|x| / 127, q = round(x / s).

    Args:
        x: (N, K) float weight (or any shape when per_channel is False).
        per_channel: one scale per row (output channel) instead of one for the tensor.

    Returns:
        q: int8, the shape of x, in [-127, 127].
        scale: fp32, (N, 1) per channel or () per tensor.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: absmax_quantize is not implemented yet (lab02_numerics/quantize.py)")


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x' = s q, in `dtype`."""
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: absmax_dequantize is not implemented yet (lab02_numerics/quantize.py)")


def zeropoint_quantize(x: torch.Tensor, *, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8: s = (max - min) / 255, z = -128 - round(min / s), q = clamp(round(x / s) + z, -128, 127).

    Uses all 256 levels even when x is one-sided (a post-ReLU activation, a biased row).

    Returns:
        q: int8, the shape of x.
        scale: fp32, (N, 1) per channel or () per tensor.
        zero_point: fp32, integer-valued, the shape of scale; the level q that represents x = 0.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: zeropoint_quantize is not implemented yet (lab02_numerics/quantize.py)")


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x' = s (q - z), in `dtype`."""
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: zeropoint_dequantize is not implemented yet (lab02_numerics/quantize.py)")


# -----------------------------------------------------------------------------
# int4: packing and group-wise quantization


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) int8 values in [-8, 7] -> (..., K / 2) uint8: (q[2j] + 8) | (q[2j + 1] + 8) << 4.

    Raises:
        TypeError: q is not int8.  ValueError: K is odd, or a value lies outside [-8, 7].
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: pack_int4 is not implemented yet (lab02_numerics/quantize.py)")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K / 2) uint8 -> (..., K) int8 in [-8, 7]; the exact inverse of pack_int4."""
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: unpack_int4 is not implemented yet (lab02_numerics/quantize.py)")


def int4_quantize(w: torch.Tensor, *, group_size: int = 64) -> Int4Weight:
    """Group-wise symmetric int4: per row n and group g, s = max|w| / 7 and q = clamp(round(w / s), -8, 7).

    Args:
        w: (N, K) float weight; K even, divisible by group_size.
        group_size: P, the number of consecutive inputs sharing one scale.

    Raises:
        TypeError: unsupported dtype.  ValueError: odd K, or a group size that does not divide K.
    """
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: int4_quantize is not implemented yet (lab02_numerics/quantize.py)")


def int4_dequantize(qw: Int4Weight, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weight in `dtype`: w' = s_g q."""
    # TODO (lab02): your code here
    raise NotImplementedError("lab02: int4_dequantize is not implemented yet (lab02_numerics/quantize.py)")
