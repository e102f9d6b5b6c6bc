"""Lab 05 hidden tests (ZeRO-2): a unit whose gradients never all arrive; three ranks; the whole model as one unit."""

import pytest

from common.testing import describe


@pytest.mark.points(2)
@pytest.mark.time_limit(240)
def test_zero2_unit_with_an_unused_parameter(student):
    """The last block holds a parameter no forward uses, in a unit of its own (the last to reduce before root):
    that unit gets no gradient at all and is reduced as zeros at the end of backward. Three ranks, three
    micro-batches a step, no weight decay (an unused parameter then stays as it is, as torch's AdamW leaves it)."""
    from autograder.lab05_zero.workers import check_training, expected_training, train

    adamw = {"weight_decay": 0.0}
    spec = {"config": {"stage": 2}, "adamw": adamw, "steps": 2, "micro": 3, "seed": 42, "unused": True,
            "units": "unused-first"}
    results = student.run(train, [spec], 3, timeout_s=200)[0]
    want = expected_training(steps=2, world_size=3, micro=3, seed=42, adamw=adamw, unused=True)
    check_training(results, want, name="ZeRO2", inputs=describe(stage=2, world_size=3, micro_batches=3,
                                                                unused_parameter=True))


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_zero2_whole_model_as_one_unit(student):
    """units=[] (as rank 0 of four): one reduce-scatter per backward, of the one root unit."""
    from autograder.lab05_zero.workers import train_local

    spec = {"config": {"stage": 2}, "steps": 1, "micro": 3, "seed": 48, "units": "none"}
    got = student.run(train_local, [spec], 4)[0]
    counts = [sum("reduce_scatter" in name for name, _ in calls) for calls in got["traces"]]
    assert counts == [1, 1, 1], f"one unit: one reduce-scatter per backward, got {counts}"
    assert all(not names for names in got["grads_left"]), "parameters kept a .grad after backward"
