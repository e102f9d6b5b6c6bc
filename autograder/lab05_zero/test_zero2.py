"""Lab 05, part 3: ZeRO-2, gradients reduce-scattered during backward (zero2.py)."""

import pytest

from common.testing import describe

REDUCE_SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter")


# -----------------------------------------------------------------------------
# Tests: run in the grader (the producers are in workers.py)


@pytest.mark.points(3)
@pytest.mark.time_limit(90)
def test_gradients_reduce_scattered_during_backward(student):
    """As rank 0 of four (torch's fake process group: the shapes, hooks and calls of a real run): each backward
    calls one reduce-scatter per unit and no all-reduce, the first before backward has produced its last gradient,
    and no parameter keeps a .grad afterwards; the event log has every gradient, and each unit's reduce-scatter,
    in backward order, waited for before the next is launched."""
    from autograder.lab05_zero.workers import train_local

    spec = {"config": {"stage": 2, "record_events": True}, "steps": 2, "micro": 2, "seed": 31}
    got = student.run(train_local, [spec], 4)[0]
    units = ["blocks.2", "blocks.1", "blocks.0", "root"]
    for index, calls in enumerate(got["traces"]):
        where = f"backward {index + 1} of 4 (2 steps x 2 micro-batches), world_size=4, trace {calls}"
        scatters = [count for name, count in calls if name in REDUCE_SCATTERS]
        assert len(scatters) == len(units), (
            f"ZeRO2 should reduce-scatter once per unit ({len(units)}) during each backward, it did {len(scatters)} "
            f"times ({where})")
        assert not any(name == "all_reduce" for name, _ in calls), f"ZeRO2 must not all-reduce gradients ({where})"
        assert scatters[0] < got["num_trainable"], (
            f"no overlap: the first reduce-scatter came after all {got['num_trainable']} gradients were ready "
            f"({where})")
        assert got["grads_left"][index] == [], (
            f"after backward {index + 1} these parameters still hold a .grad: {got['grads_left'][index][:4]}; "
            "ZeRO-2 keeps only the rank's gradient shard")
    events = got["events"]
    ready = sum(kind == "grad_ready" for kind, _ in events)
    assert ready == 4 * got["num_trainable"], (
        f"ZeRO2.events: {ready} 'grad_ready' entries in four backward passes, expected one per trainable parameter "
        f"per backward ({4 * got['num_trainable']})")
    want = [(kind, unit) for unit in units for kind in ("reduce_scatter", "wait")]
    for index, (start, stop) in enumerate(zip([0, *got["event_marks"]], got["event_marks"])):
        flow = [(kind, detail) for kind, detail in events[start:stop] if kind in ("reduce_scatter", "wait")]
        assert flow == want, (
            f"ZeRO2.events of backward {index + 1}: each unit's reduce-scatter is launched in the order {units} and "
            f"waited for (its staging buffer freed) before the next one is launched, all before backward returns; "
            f"got {flow}")


@pytest.mark.points(6)
@pytest.mark.time_limit(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_zero2_matches_single_process(student, world_size):
    """Three AdamW steps of ZeRO-2 with two micro-batches each (the shards accumulate), tied, frozen and uneven
    parameters, different initial weights per rank: losses, parameters, masters and logits equal single-process
    training on the whole batch, and no rank keeps a full gradient after backward."""
    from autograder.lab05_zero.workers import check_training, expected_training, train

    spec = {"config": {"stage": 2}, "steps": 3, "micro": 2, "seed": 22}
    results = student.run(train, [spec], world_size, timeout_s=200)[0]
    want = expected_training(steps=3, world_size=world_size, micro=2, seed=22)
    inputs = describe(stage=2, world_size=world_size, micro_batches=2, steps=3)
    check_training(results, want, name="ZeRO2", inputs=inputs)
    for rank, got in enumerate(results):
        left = [names for names in got["grads_left"] if names]
        assert not left, f"ZeRO2 (rank {rank}, {inputs}): parameters kept a .grad after backward: {left[0][:4]}"
