"""Lab 02's formulas, written again from the equations in the lab's docstrings: what the grader expects.

The grading process never imports the lab, so every expectation is computed here: the int8 and int4 scales, the NF4
levels and the nearest level of each weight, the packed layout, double quantization. Tests import this module inside
their functions (`from autograder.lab02_numerics.formulas import ...`); it imports no lab code.

Codes are chosen in fp32 arithmetic, as a student's code computes them, so the grader's codes match a correct
solution's except at exact rounding ties (which `nearest_code_error` and `count_code_flips` tolerate where the
comparison is on a student's own codes).
"""

from __future__ import annotations

import torch

SCALE_FLOOR = 1e-12  # the lab's MIN_SCALE: any positive floor keeps a zero row's codes at zero


# -----------------------------------------------------------------------------
# int8


def absmax_scale(x: torch.Tensor, *, per_channel: bool) -> torch.Tensor:
    """s = max|x| / 127, per row (N, 1) or per tensor (), in float64."""
    magnitude = x.detach().double().abs()
    largest = magnitude.max(dim=1, keepdim=True).values if per_channel else magnitude.max()
    return torch.clamp(largest / 127.0, min=SCALE_FLOOR)


def zeropoint_scale(x: torch.Tensor, *, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, min x) with s = (max x - min x) / 255, per row or per tensor, in float64."""
    values = x.detach().double()
    if per_channel:
        low, high = values.min(dim=1, keepdim=True).values, values.max(dim=1, keepdim=True).values
    else:
        low, high = values.min(), values.max()
    return torch.clamp((high - low) / 255.0, min=SCALE_FLOOR), low


# -----------------------------------------------------------------------------
# int4: packing and group-wise codes


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) integer codes in [-8, 7] -> (..., K / 2) uint8, byte j = (c[2j] + 8) + 16 (c[2j + 1] + 8)."""
    shifted = codes.to(torch.int32) + 8
    return (shifted[..., ::2] + 16 * shifted[..., 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., K / 2) uint8 -> (..., K) int64 codes in [-8, 7] (column 2j from the low nibble)."""
    byte = packed.to(torch.int64)
    pairs = torch.stack((byte % 16 - 8, byte // 16 - 8), dim=-1)  # (..., K / 2, 2)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def int4_encode(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise int4 of a (N, K) weight, computed in fp32: (codes (N, K) int64, scales (N, K / P) fp32)."""
    N, K = w.shape
    grouped = w.detach().float().view(N, K // group_size, group_size)
    scales = torch.clamp(grouped.abs().max(dim=-1).values / 7.0, min=SCALE_FLOOR)
    codes = torch.clamp(torch.round(grouped / scales.unsqueeze(-1)), -8, 7)
    return codes.view(N, K).to(torch.int64), scales


def int4_decode(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W' = s_g q in float64, from packed codes (N, K / 2) and scales (N, K / P)."""
    codes = unpack_nibbles(packed).double()
    return codes * scales.double().repeat_interleave(group_size, dim=1)


# -----------------------------------------------------------------------------
# NF4


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in float64 (QLoRA, Section 3): normal quantiles of 8 positive and 7 negative points."""
    delta = (1.0 / 30.0 + 1.0 / 32.0) / 2.0
    upper = torch.special.ndtri(torch.linspace(1.0 - delta, 0.5, 9, dtype=torch.float64))[:8]
    lower = torch.special.ndtri(torch.linspace(1.0 - delta, 0.5, 8, dtype=torch.float64))[:7]
    levels = torch.sort(torch.cat((upper, -lower, torch.tensor([0.0], dtype=torch.float64)))).values
    return levels / levels.abs().max()


def nf4_encode(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 of a (N, K) weight in fp32: (level index (N, K) int64 in 0..15, block absmax (N, K / B) fp32)."""
    N, K = w.shape
    blocks = w.detach().float().view(N, K // block_size, block_size)
    scales = torch.clamp(blocks.abs().max(dim=-1).values, min=SCALE_FLOOR)
    normed = (blocks / scales.unsqueeze(-1)).view(N, K, 1)
    levels = nf4_levels().float()
    return (normed - levels).abs().argmin(dim=-1), scales


def nf4_decode(packed: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """W' = c1 codebook[index] in float64; the nibble is the level index."""
    index = unpack_nibbles(packed) + 8
    return nf4_levels()[index] * scales.double().repeat_interleave(block_size, dim=1)


def double_quant(scales: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """QLoRA's double quantization of (S,) scales, computed in fp32: centred by their mean, absmax int8 per block.

    Returns {"q": (S,) int64, "second": (ceil(S / block),) fp32, "mean": () fp32}."""
    flat = scales.detach().float().reshape(-1)
    mean = flat.mean()
    centred = flat - mean
    count = -(-flat.numel() // block)
    second = torch.stack([centred[b * block:(b + 1) * block].abs().max() for b in range(count)]) / 127.0
    second = torch.clamp(second, min=SCALE_FLOOR)
    q = torch.clamp(torch.round(centred / second.repeat_interleave(block)[:flat.numel()]), -127, 127)
    return {"q": q.to(torch.int64), "second": second, "mean": mean}


def double_dequant(q: torch.Tensor, second: torch.Tensor, mean: torch.Tensor, block: int) -> torch.Tensor:
    """c1' = c2[i // block] q[i] + mean, in float64."""
    return q.double() * second.double().repeat_interleave(block)[:q.numel()] + mean.double()


# -----------------------------------------------------------------------------
# Comparing a student's codes with the formulas


def nearest_code_error(codes: torch.Tensor, exact: torch.Tensor) -> float:
    """How much farther than half a step the codes are from the exact real values (<= ~0 for nearest rounding)."""
    return float(((codes.double() - exact.double()).abs() - 0.5).max()) if codes.numel() else 0.0


def count_code_flips(got: torch.Tensor, expected: torch.Tensor, *, step: torch.Tensor, what: str) -> None:
    """Dequantized weights must equal the grader's, except a few elements one grid step away (a rounding tie
    broken the other way: at most 1 in 10^4 elements, and at most one step each)."""
    difference = (got.double() - expected.double()).abs()
    step = step.double().expand_as(difference)
    off = difference > 1e-6 * expected.double().abs() + 1e-9
    too_far = difference > step * 1.001 + 1e-9
    if too_far.any():
        index = [int(i) for i in torch.unravel_index((difference - step).argmax(), difference.shape)]
        raise AssertionError(f"{what}: element {index} is {got[tuple(index)].item():.6g}, expected "
                             f"{expected[tuple(index)].item():.6g} (more than one grid step off)")
    if int(off.sum()) > max(2, off.numel() // 10_000):
        index = [int(i) for i in off.nonzero()[0]]
        raise AssertionError(f"{what}: {int(off.sum())} of {off.numel()} elements differ from the expected "
                             f"quantization; first at {index}: got {got[tuple(index)].item():.6g}, expected "
                             f"{expected[tuple(index)].item():.6g}")
