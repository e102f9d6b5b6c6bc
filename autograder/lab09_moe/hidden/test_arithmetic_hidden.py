"""Lab 09 hidden tests (arithmetic): the same ideas on inputs the public tests do not show."""

import math

import pytest
import torch


@pytest.mark.points(1)
def test_parameter_counts_with_multi_query_attention(student):
    """num_kv_heads = 1 (MQA) and k = E (every expert active)."""
    from autograder.lab09_moe.test_arithmetic import _expected_counts, counts_of

    overrides = {"num_kv_heads": 1, "num_layers": 5}
    got = student.run(counts_of, "tiny", overrides, dict(num_experts=3, top_k=3, ffn_width=48))
    total, active = _expected_counts("tiny", overrides, 3, 3, 48)
    assert (got["total"], got["active"]) == (total, active) and total == active, (
        f"parameter_counts(tiny MQA, E=k=3): {got}, expected total = active = {total}")


@pytest.mark.points(1)
def test_all_to_all_bytes_for_many_ranks(student):
    """P = 64 ranks: almost every row leaves its rank."""
    from autograder.lab09_moe.test_arithmetic import bytes_of

    kwargs = dict(num_tokens=8192, width=7168, top_k=8, ep_size=64, bytes_per_element=1, backward=True)
    got = student.run(bytes_of, kwargs)
    assert math.isclose(got, 4 * 8192 * 8 * 7168 * 63 / 64, rel_tol=1e-12), f"all_to_all_bytes({kwargs}) = {got}"


@pytest.mark.points(1)
def test_load_imbalance_of_float_counts(student):
    """Float counts (fractions of tokens, as averaged over steps) work too."""
    from autograder.lab09_moe.test_arithmetic import imbalance_of

    got = student.run(imbalance_of, torch.tensor([0.5, 1.5, 1.0]))
    assert math.isclose(got, 1.5, rel_tol=1e-9), f"load_imbalance([0.5, 1.5, 1.0]) = {got}, expected 1.5"
