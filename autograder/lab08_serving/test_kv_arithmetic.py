"""Lab 08, part 1: KV-cache arithmetic (kv_arithmetic.py): bytes per token, the largest batch, the waste of a layout.

Expectations come from the formulas, evaluated here; dtypes travel to the worker by name.
"""

import math

import pytest

# -----------------------------------------------------------------------------
# Producers: run in the worker


def kv_heads(attention: str, num_heads: int, num_kv_heads) -> int:
    from lab08_serving.kv_arithmetic import kv_heads_of

    return kv_heads_of(attention, num_heads=num_heads, num_kv_heads=num_kv_heads)


def bytes_per_token(case: dict) -> int:
    import torch

    from lab08_serving.kv_arithmetic import kv_bytes_per_token

    return kv_bytes_per_token(**{**case, "dtype": getattr(torch, case["dtype"])})


def batch_size(case: dict) -> int:
    from lab08_serving.kv_arithmetic import max_batch_size

    return max_batch_size(**case)


def wastes(counts: list[int], max_seq_len: int, block_size: int) -> tuple[float, float]:
    from lab08_serving.kv_arithmetic import contiguous_waste, paged_waste

    return contiguous_waste(counts, max_seq_len=max_seq_len), paged_waste(counts, block_size=block_size)


# -----------------------------------------------------------------------------
# Tests: run in the grader

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float64": 8}


@pytest.mark.points(2)
@pytest.mark.parametrize("attention, num_heads, num_kv_heads, expected", [
    ("mha", 12, None, 12), ("mha", 6, 3, 6), ("mqa", 12, None, 1), ("mqa", 7, 7, 1), ("gqa", 12, 4, 4),
    ("gqa", 12, 12, 12), ("gqa", 5, 1, 1),
])
def test_kv_heads_per_attention_kind(student, attention, num_heads, num_kv_heads, expected):
    """MHA keeps a K/V head per query head, MQA one, GQA the given number (num_kv_heads is ignored unless gqa)."""
    got = student.run(kv_heads, attention, num_heads, num_kv_heads)
    assert got == expected, (
        f"kv_heads_of({attention!r}, num_heads={num_heads}, num_kv_heads={num_kv_heads}) = {got}, expected {expected}")


@pytest.mark.points(3)
@pytest.mark.parametrize("case", [
    dict(num_layers=32, num_heads=32, head_dim=128, dtype="bfloat16", attention="gqa", num_kv_heads=8),
    dict(num_layers=32, num_heads=32, head_dim=128, dtype="bfloat16", attention="mha"),
    dict(num_layers=32, num_heads=32, head_dim=128, dtype="bfloat16", attention="mqa"),
    dict(num_layers=3, num_heads=6, head_dim=10, dtype="float32", attention="gqa", num_kv_heads=3),
    dict(num_layers=5, num_heads=4, head_dim=16, dtype="float8_e4m3fn", attention="mha"),
    dict(num_layers=7, num_heads=9, head_dim=6, dtype="float64", attention="mqa"),
])
def test_bytes_per_token(student, case):
    """2 * L * H_kv * D * element size, over attention kinds, dtypes (fp8 to fp64) and odd sizes."""
    kv_heads = {"mha": case["num_heads"], "mqa": 1}.get(case["attention"], case.get("num_kv_heads"))
    expected = 2 * case["num_layers"] * kv_heads * case["head_dim"] * ELEMENT_BYTES[case["dtype"]]
    got = student.run(bytes_per_token, case)
    assert got == expected, f"kv_bytes_per_token({case}) = {got}, expected {expected} (2 * L * H_kv * D * bytes)"


@pytest.mark.points(1)
@pytest.mark.parametrize("attention, num_heads, num_kv_heads", [("gqa", 8, None), ("gqa", 8, 3), ("gqa", 8, 0),
                                                                ("bert", 8, None)])
def test_bad_attention_kinds_raise(student, attention, num_heads, num_kv_heads):
    """gqa without num_kv_heads, with one that does not divide num_heads, or 0, and an unknown kind: ValueError."""
    with pytest.raises(ValueError):
        student.run(kv_heads, attention, num_heads, num_kv_heads)


@pytest.mark.points(3)
@pytest.mark.parametrize("case", [
    dict(memory_bytes=141e9, weight_bytes=16e9, bytes_per_token=131072, seq_len=4096),
    dict(memory_bytes=1000, weight_bytes=100, bytes_per_token=8, seq_len=10, utilization=0.9),
    dict(memory_bytes=1000, weight_bytes=100, bytes_per_token=8, seq_len=10, utilization=0.9, activation_bytes=81),
    dict(memory_bytes=100, weight_bytes=20, bytes_per_token=4, seq_len=5, utilization=1.0),
    dict(memory_bytes=100, weight_bytes=100, bytes_per_token=4, seq_len=5, utilization=1.0),
    dict(memory_bytes=97, weight_bytes=3, bytes_per_token=7, seq_len=3, utilization=1.0, activation_bytes=2),
])
def test_max_batch_size(student, case):
    """floor((u * memory - weights - activations) / (N * bytes/token)); exact fits and a full memory (0) included."""
    left = case.get("utilization", 0.9) * case["memory_bytes"] - case["weight_bytes"] - case.get("activation_bytes", 0)
    expected = math.floor(left / (case["seq_len"] * case["bytes_per_token"]) + 1e-9)
    got = student.run(batch_size, case)
    assert got == expected, f"max_batch_size({case}) = {got}, expected {expected}"


@pytest.mark.points(1)
@pytest.mark.parametrize("weight_bytes", [95, 90.5])
def test_max_batch_size_rejects_weights_that_do_not_fit(student, weight_bytes):
    """Weights beyond u * memory, even by half a byte: ValueError."""
    with pytest.raises(ValueError, match="fit"):
        student.run(batch_size, dict(memory_bytes=100, weight_bytes=weight_bytes, bytes_per_token=1, seq_len=1,
                                     utilization=0.9))


@pytest.mark.points(3)
@pytest.mark.parametrize("counts, max_seq_len, block_size", [
    ([5, 16, 1, 33], 40, 16), ([7], 7, 7), ([3, 9, 27], 64, 1), ([100, 250, 17, 64], 512, 16), ([12, 13], 13, 5),
])
def test_waste_of_contiguous_and_paged_caches(student, counts, max_seq_len, block_size):
    """1 - sum(n) / (R * max_seq_len) against 1 - sum(n) / sum(ceil(n / bs) * bs)."""
    contiguous = 1 - sum(counts) / (len(counts) * max_seq_len)
    paged = 1 - sum(counts) / sum(-(-n // block_size) * block_size for n in counts)
    got = student.run(wastes, counts, max_seq_len, block_size)
    assert got[0] == pytest.approx(contiguous, abs=1e-12), \
        f"contiguous_waste({counts}, max_seq_len={max_seq_len}) = {got[0]}, expected {contiguous}"
    assert got[1] == pytest.approx(paged, abs=1e-12), \
        f"paged_waste({counts}, block_size={block_size}) = {got[1]}, expected {paged}"
