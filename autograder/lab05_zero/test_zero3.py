"""Lab 05, part 4: ZeRO-3, parameters gathered around each unit and freed after (zero3.py)."""

import math

import pytest

from common.testing import describe

ALL_GATHERS = ("all_gather_single", "all_gather_into_tensor", "all_gather")
REDUCE_SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter")


# -----------------------------------------------------------------------------
# Tests: run in the grader (the producers are in workers.py)


def _unit_bytes(world_size: int) -> dict[str, int]:
    from autograder.lab05_zero.workers import make_model, unit_numels

    return {unit: 8 * math.ceil(numel / world_size) * world_size
            for unit, numel in unit_numels(make_model(seed=0)).items()}


@pytest.mark.points(4)
@pytest.mark.time_limit(90)
@pytest.mark.parametrize("prefetch", [True, False])
def test_gathers_and_frees_around_each_unit(student, prefetch):
    """As rank 0 of four (fake process group), two steps of two micro-batches: at each block's forward exactly the
    root, that block and (with prefetch) the next block hold memory, each its whole padded flat buffer; at each
    gradient of a block, the root, that block and (with prefetch) the block before it; nothing after backward,
    after step or after a no-grad forward; one
    all-gather per unit in forward and per block in backward, one reduce-scatter per unit; peak_gathered_bytes is
    the most the test saw."""
    from autograder.lab05_zero.workers import train_local

    spec = {"config": {"stage": 3, "prefetch": prefetch}, "steps": 2, "micro": 2, "seed": 33,
            "backward_snapshots": True}
    got = student.run(train_local, [spec], 4)[0]
    sizes = _unit_bytes(4)
    inputs = describe(stage=3, world_size=4, prefetch=prefetch)
    seen_most = 0
    for kind, where, units in got["snapshots"]:
        total = sum(units.values())
        seen_most = max(seen_most, total)
        context = f"{kind} {where}: gathered units {sorted(units)} ({inputs})"
        for unit, nbytes in units.items():
            assert nbytes == sizes[unit], f"{unit} holds {nbytes} bytes, its padded flat buffer is {sizes[unit]} " \
                                          f"({context})"
        if kind == "forward":
            index = int(where.split(".")[1])
            want = {"root", where} | ({f"blocks.{index + 1}"} if prefetch and index + 1 < 3 else set())
            assert set(units) == want, f"at the forward of {where} expected exactly {sorted(want)} gathered " \
                                       f"({context})"
        elif kind == "backward":  # at a gradient of `where`: its unit (and, prefetched, the one backward runs next)
            unit = ".".join(where.split(".")[:2]) if where.startswith("blocks.") else "root"
            want = {"root", unit}
            if unit != "root" and prefetch and int(unit.split(".")[1]) > 0:
                want.add(f"blocks.{int(unit.split('.')[1]) - 1}")
            assert set(units) == want, f"at a gradient of {where} expected exactly {sorted(want)} gathered " \
                                       f"({context})"
        else:
            assert not units, f"ZeRO3 must free every gathered unit ({context})"
    assert not got["after_eval"], f"a no-grad forward left {sorted(got['after_eval'])} gathered ({inputs})"
    assert got["peak_gathered"] == seen_most, (
        f"ZeRO3.peak_gathered_bytes is {got['peak_gathered']}, but the test saw {seen_most} bytes of parameters "
        f"gathered at once ({inputs})")
    for index, calls in enumerate(got["traces"]):
        gathers = sum(name in ALL_GATHERS for name, _ in calls)
        scatters = sum(name in REDUCE_SCATTERS for name, _ in calls)
        assert (gathers, scatters) == (7, 4), (
            f"forward and backward {index + 1} called {gathers} all-gathers and {scatters} reduce-scatters; expected "
            f"7 (root and 3 blocks in forward, 3 blocks again in backward) and 4 (one per unit) ({inputs})")


@pytest.mark.points(6)
@pytest.mark.time_limit(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_zero3_matches_single_process(student, world_size):
    """Three AdamW steps of ZeRO-3 with two micro-batches each, tied, frozen and uneven parameters, different initial
    weights per rank: losses, parameters (as gathered in a forward), masters and logits equal single-process
    training on the whole batch."""
    from autograder.lab05_zero.workers import check_training, expected_training, train

    spec = {"config": {"stage": 3}, "steps": 3, "micro": 2, "seed": 23}
    results = student.run(train, [spec], world_size, timeout_s=200)[0]
    want = expected_training(steps=3, world_size=world_size, micro=2, seed=23)
    check_training(results, want, name="ZeRO3", inputs=describe(stage=3, world_size=world_size, micro_batches=2))
