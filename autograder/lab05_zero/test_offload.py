"""Lab 05, part 5: ZeRO-Offload, the optimizer state and step on the CPU (offload.py)."""

import pytest

from common.testing import describe


# -----------------------------------------------------------------------------
# Tests: run in the grader (the producers are in workers.py)


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_copies_start_during_backward(student, stage):
    """As rank 0 of four (fake process group): with offload the engine's optimizer is offloaded, every state tensor is
    in CPU memory, and each unit's gradient shard is handed to OffloadAdamW.receive once per backward, the first
    before backward has produced its last gradient (the copies overlap the backward)."""
    from autograder.lab05_zero.workers import train_local

    spec = {"config": {"stage": stage, "offload": True}, "steps": 1, "micro": 2, "seed": 34, "offload_trace": True}
    got = student.run(train_local, [spec], 4)[0]
    inputs = describe(stage=stage, world_size=4, offload=True, micro_batches=2)
    assert got["state_devices"] == ["cpu"], f"offloaded state lives on {got['state_devices']} ({inputs})"
    calls = got["receive_calls"]
    assert len(calls) == 2 * 4, (f"OffloadAdamW.receive was called {len(calls)} times in two backward passes; "
                                 f"expected once per unit (4) per backward ({inputs})")
    assert min(calls) < got["num_trainable"], (
        f"no overlap: every gradient copy started after all {got['num_trainable']} gradients were ready; counts "
        f"of gradients ready at each call: {calls} ({inputs})")


@pytest.mark.points(4)
@pytest.mark.time_limit(240)
def test_offload_matches_single_process(student):
    """Stages 1, 2 and 3 with offload, on two ranks, three steps of two micro-batches: the same losses, parameters,
    masters and logits as single-process training (offloading moves the state, not the math)."""
    from autograder.lab05_zero.workers import check_training, expected_training, train

    specs = [{"config": {"stage": stage, "offload": True}, "steps": 3, "micro": 2, "seed": 24} for stage in (1, 2, 3)]
    results = student.run(train, specs, 2, timeout_s=200)
    want = expected_training(steps=3, world_size=2, micro=2, seed=24)
    for stage, ranks in zip((1, 2, 3), results):
        check_training(ranks, want, name=f"ZeRO{stage} with offload", inputs=describe(stage=stage, world_size=2))
        for rank, got in enumerate(ranks):
            assert got["state_devices"] == ["cpu"], f"stage {stage}, rank {rank}: state on {got['state_devices']}"
