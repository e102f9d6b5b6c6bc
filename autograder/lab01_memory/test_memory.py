"""Lab 01, part 3: saved-activation memory per plan, measured against the memory equation (memory.py)."""

import pytest
import torch

from common.testing import corpus_batch, tiny_model

PLANS = {
    "none": dict(plan="none"),
    "every_k=1": dict(plan="every_k", k=1),
    "every_k=2": dict(plan="every_k", k=2),
    "sqrt": dict(plan="sqrt"),
    "segments=2": dict(plan="segments", num_segments=2),
}

# -----------------------------------------------------------------------------
# Producers: run in the worker


def predicted(baseline: int, per_block: list[int], input_bytes: int, plan: dict) -> int:
    from lab01_memory.memory import predict_saved_bytes
    from lab01_memory.plans import CheckpointConfig

    return predict_saved_bytes(baseline, per_block, input_bytes, CheckpointConfig(**plan))


def measured_report(num_layers: int, seq_len: int) -> dict:
    """measure_plans on a tiny model (dropout 0.1, eval mode), and whether the model was left unchanged."""
    from lab01_memory.memory import measure_plans
    from lab01_memory.plans import CheckpointConfig

    model = tiny_model(num_layers=num_layers, dropout=0.1).eval()
    runner = model.block_runner
    tokens, targets = corpus_batch(batch_size=2, seq_len=seq_len)
    rows = measure_plans(model, tokens, targets, {name: CheckpointConfig(**p) for name, p in PLANS.items()})
    return {"rows": {r.plan: (int(r.measured_bytes), int(r.predicted_bytes)) for r in rows},
            "runner_unchanged": model.block_runner is runner}


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _formula(baseline: int, per_block: list[int], input_bytes: int, segments: list[tuple[int, int]]) -> int:
    return baseline - sum(sum(per_block[a:b]) - input_bytes for a, b in segments)


@pytest.mark.points(2)
@pytest.mark.parametrize("plan, expected_segments", [
    (dict(plan="none"), []),
    (dict(plan="every_k", k=1), [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    (dict(plan="every_k", k=3), [(0, 1), (3, 4)]),
    (dict(plan="segments", num_segments=2), [(0, 3), (3, 5)]),
    (dict(plan="sqrt"), [(0, 3), (3, 5)]),
])
def test_predict_saved_bytes_formula(student, plan, expected_segments):
    """saved(plan) = S - sum_s (sum_{b in s} S_b - I_s), on made-up numbers (uneven block sizes, 5 blocks)."""
    per_block = [1000, 1100, 1200, 1300, 1700]
    segments = expected_segments
    expected = _formula(7000, per_block, 130, segments)
    got = student.run(predicted, 7000, per_block, 130, plan)
    assert got == expected, (
        f"predict_saved_bytes(S=7000, S_b={per_block}, I=130, {plan}) = {got}, expected {expected} "
        f"(off by {got - expected:+d} bytes; segments {segments})")


@pytest.mark.points(3)
@pytest.mark.parametrize("num_layers", [4, 7])
def test_saved_bytes_drop_as_predicted(student, num_layers):
    """Measured saved-activation bytes equal the prediction for every plan, checkpointing really saves memory, and
    measure_plans leaves the model it was given unchanged."""
    report = student.run(measured_report, num_layers, 24)
    rows = report["rows"]
    assert set(rows) == set(PLANS), f"measure_plans returned plans {sorted(rows)}, expected {sorted(PLANS)}"
    for name, (measured, predicted_bytes) in rows.items():
        assert measured == predicted_bytes, (
            f"measure_plans ({num_layers} blocks): plan {name} saved {measured} bytes but the memory equation "
            f"predicts {predicted_bytes} (off by {measured - predicted_bytes:+d})")
    none = rows["none"][0]
    assert rows["every_k=2"][0] < 0.75 * none, "checkpointing every other block should save more than 25%"
    assert rows["sqrt"][0] < 0.4 * none, f"the sqrt plan kept {rows['sqrt'][0]} of {none} bytes; expected under 40%"
    assert report["runner_unchanged"], "measure_plans must not install checkpointing on the model it was given"
