"""Lab 08 hidden tests (KV arithmetic): other sizes and dtypes than the public tests show."""

import pytest


@pytest.mark.points(1)
def test_fp16_gqa_and_a_large_model(student):
    """Llama-2-70B-like: 80 layers, 64 heads on 8 K/V heads, D = 128, fp16: 320 KiB per token."""
    from autograder.lab08_serving.test_kv_arithmetic import bytes_per_token

    case = dict(num_layers=80, num_heads=64, head_dim=128, dtype="float16", attention="gqa", num_kv_heads=8)
    assert student.run(bytes_per_token, case) == 2 * 80 * 8 * 128 * 2


@pytest.mark.points(1)
def test_batch_size_floors_and_waste_of_one_sequence(student):
    """A remainder just short of one more sequence; the waste of a single sequence, paged and contiguous."""
    from autograder.lab08_serving.test_kv_arithmetic import batch_size, wastes

    got = student.run(batch_size, dict(memory_bytes=10_000, weight_bytes=1_000, bytes_per_token=10, seq_len=30,
                                       utilization=0.5, activation_bytes=799))
    assert got == (5_000 - 1_000 - 799) // 300, f"max_batch_size = {got}"
    contiguous, paged = student.run(wastes, [10], 12, 4)
    assert contiguous == pytest.approx(1 - 10 / 12) and paged == pytest.approx(1 - 10 / 12)
