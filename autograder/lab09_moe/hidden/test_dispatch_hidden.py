"""Lab 09 hidden tests (dispatch): the same ideas on inputs the public tests do not show."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(1)
def test_every_token_to_one_expert(student):
    """Top-1 with every token on the last expert: the others get no rows, offsets stay 0 until the end."""
    from autograder.lab09_moe.test_dispatch import _expected_plan, plan_of

    experts = torch.full((6, 1), 4, dtype=torch.int64)
    got = student.run(plan_of, experts, 5, None)
    want = _expected_plan(experts, 5, None)
    for key in ("counts", "offsets", "assignment", "token_index"):
        assert torch.equal(got[key], want[key]), f"make_dispatch (all on expert 4): {key} = {got[key].tolist()}"


@pytest.mark.points(1)
def test_no_tokens(student):
    """T = 0: an empty plan with E zero counts and E + 1 zero offsets."""
    from autograder.lab09_moe.test_dispatch import plan_of

    got = student.run(plan_of, torch.zeros(0, 2, dtype=torch.int64), 3, None)
    assert got["counts"].tolist() == [0, 0, 0] and got["offsets"].tolist() == [0, 0, 0, 0], (
        f"make_dispatch with no tokens: counts {got['counts'].tolist()}, offsets {got['offsets'].tolist()}")
    assert got["token_index"].numel() == 0 and got["assignment"].numel() == 0


@pytest.mark.points(1)
def test_everything_dropped(student):
    """keep all False: no rows at all, and every output row is zero (every token rides the residual)."""
    from autograder.lab09_moe.test_dispatch import _assignments, round_trip

    experts = _assignments(5, 3, 2, seed=8)
    x = random_tensor(5, 4, dtype=torch.float64, seed=8)
    weights = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    got = student.run(round_trip, x, experts, weights, 3, torch.zeros(5, 2, dtype=torch.bool), 1)
    assert got["rows"].shape == (0, 4), f"permute with nothing kept returned {tuple(got['rows'].shape)} rows"
    check_close(got["out"], torch.zeros(5, 4, dtype=torch.float64), name="unpermute with nothing kept",
                inputs=describe(x=x))
