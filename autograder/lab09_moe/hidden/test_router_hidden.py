"""Lab 09 hidden tests (router): the same ideas on inputs the public tests do not show."""

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(1)
def test_top_4_of_16_from_fp32_logits(student):
    """Many experts, fp32 logits: the weights come back fp32 and match the formula."""
    from autograder.lab09_moe.test_router import _expected_top_k, _logits, top_k_of

    logits = _logits(11, 16, seed=91, dtype=torch.float32)
    got = student.run(top_k_of, logits, 4, True, 2)
    weights, experts, probs, grad = _expected_top_k(logits, 4, True, probe_seed=2)
    inputs = describe(logits=logits, top_k=4)
    assert torch.equal(got["experts"], experts), f"top_k_routing on {inputs}: experts {got['experts'].tolist()}"
    check_close(got["weights"], weights, name="top_k_routing (weights, fp32 logits)", inputs=inputs)
    check_close(got["grad"], grad, name="top_k_routing (gradient, fp32 logits)", inputs=inputs)


@pytest.mark.points(1)
def test_capacity_when_every_token_wants_the_same_expert(student):
    """All T tokens pick expert 2 first: only the first `capacity` tokens keep their first choice, and the second
    choices are served after every first choice."""
    from autograder.lab09_moe.expected import kept_by_capacity
    from autograder.lab09_moe.test_router import mask_of

    experts = torch.tensor([[2, t % 2] for t in range(9)])
    got = student.run(mask_of, experts, 3, 4)
    want = torch.tensor(kept_by_capacity(experts.tolist(), 3, 4))
    assert torch.equal(got, want), f"capacity_mask(experts={experts.tolist()}, capacity=4): {got.tolist()}"


@pytest.mark.points(1)
def test_route_switch_with_tight_capacity(student):
    """Switch top-1 at capacity factor 0.5: half the tokens are dropped, their weight is 0, counts still count them."""
    from autograder.lab09_moe.expected import capacity_of, kept_by_capacity
    from autograder.lab09_moe.test_router import _expected_top_k, _logits, route_of

    logits = _logits(12, 3, seed=93)
    got = student.run(route_of, logits, 1, False, 0.5, 4)
    weights, experts, _, _ = _expected_top_k(logits, 1, False)
    keep = torch.tensor(kept_by_capacity(experts.tolist(), 3, capacity_of(12, 3, 1, 0.5)))
    assert torch.equal(got["keep"], keep), f"route (Switch, cf 0.5): keep {got['keep'].tolist()}"
    check_close(got["weights"], weights * keep, name="route (Switch, cf 0.5) weights", inputs=describe(logits=logits))
    assert got["counts"].sum().item() == 12, f"route: counts {got['counts'].tolist()} should count all 12 tokens"


@pytest.mark.points(1)
def test_expert_choice_takes_every_token_at_full_capacity(student):
    """capacity = T: every expert takes every token, in order of its score."""
    from autograder.lab09_moe.expected import probabilities
    from autograder.lab09_moe.test_router import _logits, expert_choice_of

    logits = _logits(6, 4, seed=95)
    got = student.run(expert_choice_of, logits, 6)
    probs = probabilities(logits)
    order = probs.t().argsort(dim=-1, descending=True)
    assert torch.equal(got["token_index"], order), f"expert_choice_routing(capacity=T): {got['token_index'].tolist()}"
