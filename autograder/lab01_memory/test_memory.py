"""Lab 01, part 3: saved-activation memory per plan, measured against the memory equation (memory.py)."""

import pytest
import torch


PLANS = {
    "every_k=1": dict(plan="every_k", k=1),
    "every_k=2": dict(plan="every_k", k=2),
    "sqrt": dict(plan="sqrt"),
    "segments=2": dict(plan="segments", num_segments=2),
}


@pytest.mark.points(2)
def test_predict_saved_bytes_formula():
    """saved(plan) = S - sum_s (sum_{b in s} S_b - I_s), on made-up numbers."""
    from lab01_memory.memory import predict_saved_bytes
    from lab01_memory.plans import CheckpointConfig

    per_block = [1000, 1100, 1200, 1300]
    cases = {
        ("none", 1, 1): 5000,
        ("every_k", 1, 1): 5000 - (4600 - 4 * 100),
        ("every_k", 3, 1): 5000 - (1000 - 100) - (1300 - 100),
        ("segments", 1, 2): 5000 - (2100 - 100) - (2500 - 100),
        ("sqrt", 1, 1): 5000 - (2100 - 100) - (2500 - 100),
    }
    for (plan, k, num_segments), expected in cases.items():
        config = CheckpointConfig(plan=plan, k=k, num_segments=num_segments)
        got = predict_saved_bytes(5000, per_block, 100, config)
        assert got == expected, f"predict_saved_bytes(S=5000, S_b={per_block}, I=100, {config}) = {got}, expected {expected}"


@pytest.mark.points(3)
def test_saved_bytes_drop_as_predicted(make_model, make_batch):
    """Measured saved-activation bytes equal the prediction for every plan, and checkpointing really saves memory."""
    from lab01_memory.memory import measure_plans
    from lab01_memory.plans import CheckpointConfig

    model = make_model(num_layers=4, dropout=0.1).eval()
    tokens, targets = make_batch(batch_size=2, seq_len=24)
    report = {r.plan: r for r in measure_plans(model, tokens, targets, {name: CheckpointConfig(**p)
                                                                         for name, p in [("none", {}), *PLANS.items()]})}
    for name, row in report.items():
        assert row.measured_bytes == row.predicted_bytes, (
            f"measure_plans: plan {name} saved {row.measured_bytes} bytes but the memory equation predicts "
            f"{row.predicted_bytes} (off by {row.measured_bytes - row.predicted_bytes:+d})"
        )
    none = report["none"].measured_bytes
    assert report["every_k=2"].measured_bytes < 0.75 * none, "checkpointing every other block should save >25%"
    assert report["sqrt"].measured_bytes < 0.25 * none, (
        f"the sqrt plan kept {report['sqrt'].measured_bytes} of {none} bytes; it should keep under a quarter"
    )
