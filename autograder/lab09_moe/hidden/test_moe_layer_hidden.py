"""Lab 09 hidden tests (MoE layer): the same ideas on inputs the public tests do not show."""

import pytest
import torch

from common.testing import check_all_close, check_close, describe, random_tensor


@pytest.mark.points(2)
def test_top_2_without_renormalising_at_capacity_1_25(student):
    """Top-2 with the raw probabilities as weights (renormalize=False) and capacity factor 1.25."""
    from autograder.lab09_moe.expected import moe_weights
    from autograder.lab09_moe.test_moe_layer import FFN, WIDTH, _expected, layer_of

    weights = moe_weights(num_experts=4, width=WIDTH, ffn_width=FFN, seed=71)
    x = random_tensor(3, 5, WIDTH, dtype=torch.float64, seed=71)
    config = dict(num_experts=4, top_k=2, ffn_width=FFN, renormalize=False, capacity_factor=1.25, backend="torch")
    got = student.run(layer_of, weights, config, x, 9)
    want = _expected(weights, x, 9, top_k=2, renormalize=False, capacity_factor=1.25)
    inputs = describe(x=x, **config)
    check_close(got["y"], want["y"], name="MoELayer top-2 raw weights, cf 1.25 (output)", inputs=inputs)
    check_all_close(got["grads"], want["grads"], name="MoELayer top-2 raw weights, cf 1.25 (gradients)",
                    inputs=inputs)


@pytest.mark.points(1)
def test_expert_choice_at_half_capacity(student):
    """Expert choice with capacity factor 0.5: ceil(0.5 * 2 * 10 / 4) = 3 tokens per expert."""
    from autograder.lab09_moe.expected import moe_weights
    from autograder.lab09_moe.test_moe_layer import FFN, WIDTH, _expected, layer_of

    weights = moe_weights(num_experts=4, width=WIDTH, ffn_width=FFN, seed=73)
    x = random_tensor(10, WIDTH, dtype=torch.float64, seed=73)
    config = dict(num_experts=4, top_k=2, ffn_width=FFN, capacity_factor=0.5, routing="expert_choice",
                  backend="torch")
    got = student.run(layer_of, weights, config, x, 3)
    want = _expected(weights, x, 3, top_k=2, capacity_factor=0.5, routing="expert_choice")
    check_close(got["y"], want["y"], name="MoELayer expert choice, cf 0.5 (output)", inputs=describe(x=x, **config))
    assert got["counts"].tolist() == [3, 3, 3, 3], f"expert choice cf 0.5: counts {got['counts'].tolist()}"


@pytest.mark.points(1)
def test_bf16_layer_on_the_torch_backend(student):
    """A bf16 layer (per-expert backend): the output within bf16 tolerance of float64 on the bf16 weights, routed
    on the router logits as bf16 computes them (so a near tie cannot flip an expert)."""
    from autograder.lab09_moe.expected import combine_matrix, moe_weights, swiglu_expert
    from autograder.lab09_moe.test_moe_layer import layer_of

    weights = moe_weights(num_experts=4, width=16, ffn_width=16, seed=75)
    x = random_tensor(12, 16, dtype=torch.float64, seed=75).to(torch.bfloat16)
    config = dict(num_experts=4, top_k=2, ffn_width=16, backend="torch")
    got = student.run(layer_of, weights, config, x, 1)
    assert got["y"].dtype == torch.bfloat16, f"a bf16 layer returned {got['y'].dtype}"
    rounded = {name: value.to(torch.bfloat16) for name, value in weights.items()}
    logits = torch.nn.functional.linear(x, rounded["router.weight"]).double()
    combine = combine_matrix(logits, top_k=2)
    want = sum(combine[:, e:e + 1] * swiglu_expert(x.double(), rounded["w_gate_up"][e].double(),
                                                   rounded["w_down"][e].double()) for e in range(4))
    check_close(got["y"], want, name="MoELayer bf16 (output)", inputs=describe(x=x, **config), atol=3e-2)
