"""Lab 09 hidden tests (expert parallelism): the same ideas on inputs the public tests do not show."""

import pytest
import torch

from common.testing import random_tensor


@pytest.mark.points(3)
@pytest.mark.time_limit(180)
def test_switch_with_capacity_over_two_ranks(student):
    """Top-1 (Switch weights) with capacity factor 1.0, applied per rank: the tokens each rank drops are the ones the
    unsharded layer drops on that rank's tokens; 11 and 4 tokens per rank."""
    from autograder.lab09_moe.expected import moe_weights
    from autograder.lab09_moe.test_expert_parallel import EXPERTS, FFN, WIDTH, _check_layer, ep_layer

    weights = moe_weights(num_experts=EXPERTS, width=WIDTH, ffn_width=FFN, seed=61)
    xs = [random_tensor(n, WIDTH, dtype=torch.float64, seed=60 + r) for r, n in enumerate([11, 4])]
    config = dict(num_experts=EXPERTS, top_k=1, ffn_width=FFN, renormalize=False, capacity_factor=1.0,
                  backend="torch")
    results = student.run(ep_layer, weights, config, xs, 7, 2)
    _check_layer(results, weights, xs, 7, what="ExpertParallelMoE, Switch top-1 at capacity 1.0",
                 routing=dict(top_k=1, renormalize=False, capacity_factor=1.0))
