"""Lab 06 hidden tests (the LoRA layer): the same ideas on inputs the public tests do not show."""

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(2)
@pytest.mark.parametrize("eval_mode", [False, True])
def test_input_without_gradient_and_eval_mode(student, eval_mode):
    """An input that needs no gradient still trains A and B; in eval mode dropout is off on the adapter path."""
    from autograder.lab06_lora.hidden.producers import lora_step_without_input_grad
    from autograder.lab06_lora.test_lora import _case, _expected

    config = dict(r=4, alpha=5.0, dropout=0.3, rank_stabilized=True)
    case = _case("conv1d", K=22, N=9, x_shape=(3, 4), seed=31, config=config, rng_seed=5)
    got = student.run(lora_step_without_input_grad, case, eval_mode=eval_mode)
    want = _expected({**case, "config": {**config, "dropout": 0.0}} if eval_mode else case)
    for key in ("y", "dA", "dB"):
        check_close(got[key], want[key], name=f"LoRALinear (input without grad, eval={eval_mode}): {key}",
                    inputs=describe(x=case["x"], **config))


@pytest.mark.points(1)
def test_lora_forward_with_a_separate_adapter_input(student):
    """lora_forward: x W0^T + b + s (x' A^T) B^T in float64."""
    from autograder.lab06_lora.hidden.producers import plain_formula

    from common.testing import random_tensor

    x, x_adapter = random_tensor(3, 10, seed=1, dtype=torch.float64), random_tensor(3, 10, seed=2, dtype=torch.float64)
    W, b = random_tensor(7, 10, seed=3, dtype=torch.float64), random_tensor(7, seed=4, dtype=torch.float64)
    A, B = random_tensor(2, 10, seed=5, dtype=torch.float64), random_tensor(7, 2, seed=6, dtype=torch.float64)
    got = student.run(plain_formula, x, W, b, A, B, 1.75, x_adapter)
    check_close(got, x @ W.t() + b + 1.75 * (x_adapter @ A.t()) @ B.t(), name="lora_forward",
                inputs=describe(x=x, x_adapter=x_adapter))


@pytest.mark.points(1)
def test_bf16_merge_round_trip(student):
    """In bf16, merge then unmerge gives back W0 within one bf16 rounding, and the merged output is close."""
    from autograder.lab06_lora.test_lora import _case, merge_round_trip

    case = _case(K=32, N=16, x_shape=(4,), seed=33, dtype=torch.bfloat16, config=dict(r=2, alpha=1.0))
    got = student.run(merge_round_trip, case)
    check_close(got["unmerged_w"], got["w0"], name="bf16 unmerge (restored weight)", inputs=describe(x=case["x"]),
                rtol=8e-3, atol=1e-3)
    check_close(got["merged_y"], got["y"], name="bf16 merge (output)", inputs=describe(x=case["x"]),
                dtype=torch.bfloat16)
