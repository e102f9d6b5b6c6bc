"""Lab 08 hidden tests (model runner): a multi-query model, and the Triton path on another seed."""

import pytest
import torch


@pytest.mark.points(2)
def test_runner_logits_of_an_mqa_model(student):
    """One K/V head for four query heads."""
    from autograder.lab08_serving.test_model_runner import _check_logits, runner_logits

    got = student.run(runner_logits, 11, num_kv_heads=1)
    _check_logits(got, 11, torch.float64, "ModelRunner (MQA 4/1)", num_kv_heads=1)
