"""NF4: 4-bit NormalFloat weights with double quantization of their scales (the QLoRA format; lab 06 fine-tunes on it).

What it saves: a bf16 weight shrinks from 16 bits to 4.127 bits per parameter. Dettmers et al. 2023 (QLoRA,
arXiv:2305.14314, Section 3):

NormalFloat. Pretrained weights are close to N(0, sigma). Levels placed at quantiles of N(0, 1) are used equally
often, which is information-theoretically optimal for normal data. With Phi^-1 the normal quantile function and
delta = 1/2 (1/30 + 1/32) (so the outermost level is a finite quantile):

    positive levels   Phi^-1( linspace(1 - delta, 1/2, 9)[:-1] )      8 values
    negative levels  -Phi^-1( linspace(1 - delta, 1/2, 8)[:-1] )      7 values
    codebook          sort(positive + [0] + negative) / max            16 values in [-1, 1], exactly one zero

A block of B = 64 consecutive weights (along K in each row) is scaled by its absmax c1 = max|w| and each w / c1 is
replaced by the index of its nearest level: w' = c1 * codebook[q].

Double quantization. The fp32 block scales c1 cost 32 / 64 = 0.5 bits per parameter. QLoRA quantizes them again:
subtract their mean, then quantize blocks of 256 scales to 8 bits with one fp32 constant c2 per block, which costs
8 / 64 + 32 / (64 * 256) = 0.127 bits per parameter. (QLoRA stores the second level in FP8; we use absmax int8 of the
centred scales, which keeps the bound simple: |c1 - c1'| <= c2 / 2 with c2 = max|c1 - mean| / 127 per scale block.)

Usage:
    qw = quantize_nf4(w, config=NF4Config(block_size=64, double_quant=True))
    w_hat = dequantize_nf4(qw, dtype=torch.bfloat16)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantize import MIN_SCALE, check_groups, check_weight, pack_int4, unpack_int4

# delta of QLoRA's create_normal_map: the mean of 1/(2*15) and 1/(2*16), so Phi^-1(1 - delta) stays finite
NF4_OFFSET = 0.5 * (1.0 / 30.0 + 1.0 / 32.0)

# -----------------------------------------------------------------------------
# Config and the packed format


@dataclass(frozen=True, kw_only=True)
class NF4Config:
    """block_size: weights per absmax scale (QLoRA: 64). double_quant: quantize the scales too.
    scale_block_size: scales per second-level constant (QLoRA: 256)."""

    block_size: int = 64
    double_quant: bool = True
    scale_block_size: int = 256

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"NF4Config.block_size must be a positive even number, got {self.block_size}")
        if self.scale_block_size <= 0:
            raise ValueError(f"NF4Config.scale_block_size must be positive, got {self.scale_block_size}")


@dataclass(frozen=True, kw_only=True)
class QuantizedScales:
    """Double-quantized scales: c1' = c2[b] * q[i] + mean for scale i in block b = i // scale_block_size.

    Attributes:
        q: (S,) int8 codes of the centred scales.
        second_scales: (ceil(S / scale_block_size),) fp32 second-level constants c2 (= block absmax / 127).
        mean: () fp32, the mean of all scales, subtracted before quantizing.
        scale_block_size: scales per constant.
    """

    q: torch.Tensor
    second_scales: torch.Tensor
    mean: torch.Tensor
    scale_block_size: int

    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.second_scales.numel() + 4


@dataclass(frozen=True, kw_only=True)
class NF4Weight:
    """A (N, K) weight in NF4.

    Attributes:
        packed: (N, K / 2) uint8 codebook indices, two per byte (even column in the low nibble), as quantize.pack_int4.
        scales: (N, K / block_size) fp32 absmax per block, or a QuantizedScales with double quantization.
        block_size: weights per scale.
        shape: (N, K).
    """

    packed: torch.Tensor
    scales: torch.Tensor | QuantizedScales
    block_size: int
    shape: tuple[int, int]

    def block_scales(self) -> torch.Tensor:
        """(N, K / block_size) fp32 scales, dequantizing them first under double quantization."""
        if isinstance(self.scales, QuantizedScales):
            N, K = self.shape
            return dequantize_scales(self.scales).reshape(N, K // self.block_size)
        return self.scales

    def nbytes(self) -> int:
        scale_bytes = self.scales.nbytes() if isinstance(self.scales, QuantizedScales) else 4 * self.scales.numel()
        return self.packed.numel() + scale_bytes


# -----------------------------------------------------------------------------
# The codebook


def nf4_codebook(*, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with codebook[7] == 0: QLoRA's normal-quantile construction above.

    Returns:
        (16,) tensor in `dtype` (computed in float64 from torch.special.ndtri, the normal quantile function).
    """
    # BEGIN SOLUTION
    positive = torch.special.ndtri(torch.linspace(1.0 - NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels
    negative = -torch.special.ndtri(torch.linspace(1.0 - NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels
    levels = torch.cat((positive, torch.zeros(1, dtype=torch.float64), negative)).sort().values
    return (levels / levels.abs().max()).to(device=device, dtype=dtype)
    # END SOLUTION


# -----------------------------------------------------------------------------
# Public entry points


def quantize_nf4(w: torch.Tensor, *, config: NF4Config | None = None) -> NF4Weight:
    """NF4-quantize a (N, K) weight: per block of `block_size` along K, absmax-normalise and take the nearest level.

    Raises:
        TypeError: unsupported dtype.  ValueError: odd K, or a block size that does not divide K.
    """
    config = config or NF4Config()
    # BEGIN SOLUTION
    check_weight(w, what="quantize_nf4")
    check_groups(w, config.block_size, what="quantize_nf4")
    N, K = w.shape
    blocks = w.float().reshape(N, K // config.block_size, config.block_size)  # (N, K / B, B)
    scales = blocks.abs().amax(dim=-1).clamp_min(MIN_SCALE)  # (N, K / B): c1
    normed = (blocks / scales[..., None]).reshape(N, K)  # in [-1, 1]
    codebook = nf4_codebook(device=w.device)
    # nearest level: bucketize against the midpoints between consecutive levels (16 levels, 15 boundaries)
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    index = torch.bucketize(normed, midpoints).to(torch.int8)  # (N, K) in 0..15
    packed = pack_int4(index - 8)  # pack_int4 stores q + 8, so the nibble is the codebook index itself
    stored = double_quantize(scales.flatten(), scale_block_size=config.scale_block_size) if config.double_quant \
        else scales
    return NF4Weight(packed=packed, scales=stored, block_size=config.block_size, shape=(N, K))
    # END SOLUTION


def dequantize_nf4(qw: NF4Weight, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weight in `dtype`: w' = c1[block] * codebook[index]."""
    # BEGIN SOLUTION
    N, K = qw.shape
    index = (unpack_int4(qw.packed).to(torch.int64) + 8).reshape(N, K // qw.block_size, qw.block_size)
    values = nf4_codebook(device=qw.packed.device)[index]  # (N, K / B, B) in [-1, 1]
    return (values * qw.block_scales()[..., None]).reshape(N, K).to(dtype)
    # END SOLUTION


def double_quantize(scales: torch.Tensor, *, scale_block_size: int = 256) -> QuantizedScales:
    """Quantize fp32 scales (S,) to int8: centre by their mean, absmax per block of `scale_block_size`.

    The last block may be shorter (S need not be a multiple of scale_block_size).
    """
    # BEGIN SOLUTION
    if scales.dim() != 1:
        raise ValueError(f"double_quantize: expected a 1-D tensor of scales, got shape {tuple(scales.shape)}")
    S = scales.numel()
    mean = scales.float().mean()
    centred = scales.float() - mean
    padded = torch.nn.functional.pad(centred, (0, (-S) % scale_block_size))  # zeros do not change a block's absmax
    blocks = padded.reshape(-1, scale_block_size)  # (ceil(S / 256), 256)
    second_scales = (blocks.abs().amax(dim=1) / 127.0).clamp_min(MIN_SCALE)  # c2 per block
    q = torch.round(blocks / second_scales[:, None]).clamp(-127, 127).to(torch.int8).flatten()[:S]
    return QuantizedScales(q=q, second_scales=second_scales, mean=mean, scale_block_size=scale_block_size)
    # END SOLUTION


def dequantize_scales(qs: QuantizedScales) -> torch.Tensor:
    """(S,) fp32 scales: c1' = c2[i // scale_block_size] * q[i] + mean."""
    # BEGIN SOLUTION
    block = torch.arange(qs.q.numel(), device=qs.q.device) // qs.scale_block_size
    return qs.q.float() * qs.second_scales[block] + qs.mean
    # END SOLUTION
