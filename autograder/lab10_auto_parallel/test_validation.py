"""Lab 10, part 8: validation. The cost model's predicted step time on the measured cpu-gloo profile against the
step time run_plan measures, on CPU plans whose costs differ several-fold: the rank order must match. Measured in
the worker as the median over 3 steps (after a warm-up step) of the slowest rank's step, so a loaded machine
slows every plan alike and does not swap neighbours."""

import pytest

from autograder.lab10_auto_parallel.workers import timed_plans

CASES = [
    {"plan": {}, "num_layers": 2, "batch_size": 4, "seq_len": 16},
    {"plan": {}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
    {"plan": {"pp": 2, "num_microbatches": 8}, "num_layers": 16, "batch_size": 64, "seq_len": 32},
]


@pytest.mark.points(5)
@pytest.mark.time_limit(240)
def test_rank_order(student):
    """Three plans (one process: 2 blocks at batch 4 and 8 blocks at batch 16; a 2-stage pipeline of 16 blocks, 8
    micro-batches at batch 64), each predicted and measured several times slower than the one before."""
    got = student.run(timed_plans, CASES, repeats=3)
    predicted = [g["predicted"] for g in got]
    measured = [g["measured"] for g in got]
    table = "; ".join(f"{c['plan'] or 'one process'} x {c['num_layers']} blocks: predicted {p * 1e3:.1f} ms, "
                      f"measured {m * 1e3:.1f} ms" for c, p, m in zip(CASES, predicted, measured))
    assert all(p > 0 for p in predicted), f"every predicted step time should be positive: {table}"
    assert sorted(range(3), key=predicted.__getitem__) == sorted(range(3), key=measured.__getitem__) == [0, 1, 2], (
        f"the predicted and measured step times should rank the plans alike (fastest first): {table}")
