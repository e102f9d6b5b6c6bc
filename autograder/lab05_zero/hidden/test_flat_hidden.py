"""Lab 05 hidden tests (flat buffers): more ranks than elements, many tiny parameters, fp64 in flight."""

import pytest

from common.testing import describe


@pytest.mark.points(1)
@pytest.mark.parametrize("shapes, world_size", [([(2, 2)], 9), ([(1,)] * 11, 5), ([(4,), (3, 3, 3)], 2)])
def test_layouts_with_more_ranks_than_elements(student, shapes, world_size):
    """Padding that fills whole shards, eleven one-element parameters over five ranks, and an even split."""
    from autograder.lab05_zero.test_flat import _expected_layout, layout_facts

    got = student.run(layout_facts, shapes, world_size)
    want = _expected_layout(shapes, world_size)
    inputs = describe(shapes=shapes, world_size=world_size)
    for key in ("offsets", "numel", "padded", "shard_numel", "slices"):
        assert got[key] == want[key], f"FlatLayout on {inputs}: {key} = {got[key]}, expected {want[key]}"
    assert [[tuple(p) for p in rank] for rank in got["pieces"]] == want["pieces"], f"pieces on {inputs}"


@pytest.mark.points(1)
def test_shard_module_in_float64_on_five_ranks(student):
    """fp64 in flight for an fp32 model on five ranks: buffers fp64, masters fp32, shards 1/5 of the padded size."""
    import math

    from autograder.lab05_zero.test_flat import shard_module_facts
    from autograder.lab05_zero.workers import make_model, unit_numels

    got = student.run(shard_module_facts, 5, "float64")
    numels = unit_numels(make_model(seed=3))
    for group in got["groups"]:
        padded = math.ceil(numels[group["name"]] / 5) * 5
        assert (group["full_dtype"], group["full_numel"], group["shard_numel"]) == ("torch.float64", padded,
                                                                                  padded // 5), (
            f"group {group['name']}: {group['full_dtype']}, {group['full_numel']}, {group['shard_numel']}")
    assert got["master_dtypes"] == ["torch.float32"] * 4, f"masters {got['master_dtypes']}"
