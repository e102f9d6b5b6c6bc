"""Lab 05, part 1: flat parameter buffers and their shards (flat.py)."""

import itertools
import math

import pytest
import torch

from common.testing import check_close, describe, random_tensor

LAYOUTS = [
    ([(3, 2), (5,)], 4),  # the docstring's example: padding, a parameter across two shards
    ([(7,)], 1),  # one rank: no padding
    ([(1,)], 4),  # fewer elements than ranks: three shards are all padding
    ([(), (2, 3, 1), (4, 4), (9,)], 3),  # a 0-d parameter, an odd world size
    ([(32, 41), (41,), (41, 32)], 4),
    ([(13,), (2,), (6, 5)], 7),
]


def _tensor(shape: tuple, seed: int) -> torch.Tensor:
    """Seeded random data of any shape, 0-d included."""
    return random_tensor(math.prod(shape), seed=seed).reshape(shape)


# -----------------------------------------------------------------------------
# Producers: run in the worker


def layout_facts(shapes: list, world_size: int) -> dict:
    from lab05_zero.flat import FlatLayout

    layout = FlatLayout.of(shapes, world_size=world_size)
    slices = [layout.shard_slice(rank) for rank in range(world_size)]
    return {"offsets": list(layout.offsets), "numel": layout.numel, "padded": layout.padded_numel,
            "shard_numel": layout.shard_numel, "slices": [(s.start, s.stop, s.step) for s in slices],
            "pieces": [[(p.index, p.param_start, p.shard_start, p.length) for p in layout.pieces(rank)]
                       for rank in range(world_size)]}


def flatten_and_view(shapes: list, world_size: int, dtype: str, seed: int) -> dict:
    """flatten random tensors, then write into the flat buffer: the views must see it (shared storage)."""
    from lab05_zero.flat import FlatLayout

    layout = FlatLayout.of(shapes, world_size=world_size)
    tensors = [_tensor(shape, seed + i) for i, shape in enumerate(shapes)]
    flat = layout.flatten(tensors, dtype=getattr(torch, dtype))
    views = layout.views(flat)
    before = [v.clone() for v in views]
    flat.mul_(-3)
    mixed = layout.flatten([t.double() if i == 0 else t for i, t in enumerate(tensors)])  # dtype of the first
    return {"flat": flat.clone(), "mixed_dtype": str(mixed.dtype), "views_before": before,
            "views_after": [v.clone() for v in views],
            "shapes": [tuple(v.shape) for v in views],
            "shared": all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views),
            "inputs_kept": all(torch.equal(t, _tensor(s, seed + i))
                               for i, (t, s) in enumerate(zip(tensors, shapes)))}


def layout_error(case: str) -> None:
    from lab05_zero.flat import FlatLayout

    if case == "world_size":
        FlatLayout.of([(3,)], world_size=0)
    layout = FlatLayout.of([(3, 2), (5,)], world_size=4)
    if case == "rank":
        layout.shard_slice(4)
    if case == "negative_rank":
        layout.shard_slice(-1)
    if case == "count":
        layout.flatten([torch.ones(3, 2)])
    if case == "shape":
        layout.flatten([torch.ones(2, 3), torch.ones(5)])
    if case == "views":
        layout.views(torch.ones(11))
    if case == "views_2d":
        layout.views(torch.ones(3, 4))  # the right number of elements, but not flat


def shard_module_facts(world_size: int, param_dtype: str | None, units: str = "blocks") -> dict:
    from lab05_zero.flat import shard_module
    from workers import local_group, make_model

    with local_group(world_size) as info:
        model = make_model(seed=3, dtype=torch.float32)
        original = {name: p.detach().clone() for name, p in model.named_parameters()}
        blocks = list(model.blocks) if units == "blocks" else []
        groups, masters = shard_module(model, blocks, group=None,
                                       param_dtype=getattr(torch, param_dtype) if param_dtype else None)
        params = dict(model.named_parameters())
        out = {"original": original, "groups": [], "masters": [m.clone() for m in masters],
               "master_dtypes": [str(m.dtype) for m in masters],
               "frozen": (str(params["blocks.0.attn_norm.weight"].dtype), params["blocks.0.attn_norm.weight"].clone()),
               "lm_head_is_embed": model.lm_head.weight is model.embed.weight,
               "values": {name: p.detach().clone() for name, p in params.items()}}
        for group in groups:
            full_ptr = group.full.untyped_storage().data_ptr()
            out["groups"].append({
                "name": group.name, "names": list(group.names), "full_dtype": str(group.full.dtype),
                "full_numel": group.full.numel(), "shard_numel": group.shard.numel(),
                "params_are_views": all(p.untyped_storage().data_ptr() == full_ptr for p in group.params),
                "params_are_model_params": all(p is params[n] for p, n in zip(group.params, group.names)),
                "shard_is_view": group.shard.untyped_storage().data_ptr() == full_ptr,
                "masters_are_copies": all(m.untyped_storage().data_ptr() != full_ptr for m in masters),
                "full": group.full.clone()})
        return out


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _expected_layout(shapes: list, world_size: int) -> dict:
    numels = [math.prod(shape) for shape in shapes]
    offsets = [0, *itertools.accumulate(numels)][:-1]
    total = sum(numels)
    padded = math.ceil(total / world_size) * world_size
    size = padded // world_size
    pieces = []
    for rank in range(world_size):
        low, high = rank * size, (rank + 1) * size
        mine = []
        for index, (offset, numel) in enumerate(zip(offsets, numels)):
            overlap = range(max(low, offset), min(high, offset + numel))
            if len(overlap):
                mine.append((index, overlap.start - offset, overlap.start - low, len(overlap)))
        pieces.append(mine)
    return {"offsets": offsets, "numel": total, "padded": padded, "shard_numel": size,
            "slices": [(rank * size, (rank + 1) * size, None) for rank in range(world_size)], "pieces": pieces}


@pytest.mark.points(3)
@pytest.mark.parametrize("shapes, world_size", LAYOUTS)
def test_layout_offsets_padding_and_shards(student, shapes, world_size):
    """FlatLayout.of: offsets o_i, Ψ_u, padding to a multiple of N, the shard slices [r*S, (r+1)*S) and the pieces
    of parameters in each shard, on layouts with padding, a 0-d parameter, fewer elements than ranks and odd N."""
    got = student.run(layout_facts, shapes, world_size)
    want = _expected_layout(shapes, world_size)
    inputs = describe(shapes=shapes, world_size=world_size)
    for key in ("offsets", "numel", "padded", "shard_numel"):
        assert got[key] == want[key], f"FlatLayout.of({inputs}).{key} = {got[key]}, expected {want[key]}"
    assert got["slices"] == want["slices"], (
        f"FlatLayout.shard_slice on {inputs}: {got['slices']}, expected {want['slices']} (start, stop, step)")
    for rank in range(world_size):
        assert [tuple(p) for p in got["pieces"][rank]] == want["pieces"][rank], (
            f"FlatLayout.pieces({rank}) on {inputs}: {got['pieces'][rank]}, expected {want['pieces'][rank]} "
            "as (index, param_start, shard_start, length)")


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_flatten_and_views_share_storage(student, dtype):
    """flatten lays the tensors end to end in the requested dtype with zero padding and leaves them unchanged;
    views are shaped like the parameters and share the buffer's storage (a write to the buffer shows in them)."""
    shapes, world_size = [(3, 2), (), (5,), (2, 1, 3)], 4
    got = student.run(flatten_and_view, shapes, world_size, dtype, 11)
    tensors = [_tensor(shape, 11 + i) for i, shape in enumerate(shapes)]
    numel = sum(math.prod(s) for s in shapes)
    padding = math.ceil(numel / world_size) * world_size - numel
    expected = torch.cat([t.reshape(-1) for t in tensors] + [torch.zeros(padding)]).to(getattr(torch, dtype))
    inputs = describe(shapes=shapes, world_size=world_size, dtype=dtype)
    assert got["flat"].dtype == getattr(torch, dtype), f"flatten({inputs}) returned {got['flat'].dtype}"
    check_close(got["flat"], expected * -3, name="FlatLayout.flatten (buffer, after flat.mul_(-3))", inputs=inputs,
                dtype="float64")
    assert got["shapes"] == [tuple(s) for s in shapes], f"FlatLayout.views shapes {got['shapes']} ({inputs})"
    for index, tensor in enumerate(tensors):
        want = tensor.to(getattr(torch, dtype))
        check_close(got["views_before"][index], want, name=f"FlatLayout.views (view {index})", inputs=inputs,
                    dtype="float64")
        check_close(got["views_after"][index], want * -3, name=f"FlatLayout.views (view {index} after a write "
                    "to the buffer: views must share its storage)", inputs=inputs, dtype="float64")
    assert got["shared"], f"FlatLayout.views must return views of the flat buffer, not copies ({inputs})"
    assert got["inputs_kept"], f"FlatLayout.flatten must not modify the tensors it is given ({inputs})"
    assert got["mixed_dtype"] == "torch.float64", (
        f"FlatLayout.flatten without a dtype: the first tensor's (float64), got {got['mixed_dtype']} ({inputs})")


@pytest.mark.points(1)
@pytest.mark.parametrize("case, match", [("world_size", "world_size"), ("rank", "rank"), ("negative_rank", "rank"),
                                         ("count", "tensors"), ("shape", "shape"), ("views", "flat"),
                                         ("views_2d", "flat")])
def test_layout_errors(student, case, match):
    """A world size < 1, a rank outside [0, N), the wrong number or shape of tensors and a buffer of the wrong size
    or not 1-D each raise ValueError."""
    with pytest.raises(ValueError, match=match):
        student.run(layout_error, case)


@pytest.mark.points(3)
@pytest.mark.parametrize("world_size, param_dtype, units", [(1, None, "blocks"), (4, "bfloat16", "blocks"),
                                                            (3, "float16", "none")])
def test_shard_module(student, world_size, param_dtype, units):
    """shard_module: one group per block then "root" (the tied embedding once, the frozen weight in none), each
    parameter a view of its group's buffer in the in-flight dtype, the shard a view of it, and fp32 master shards of
    their own holding rank 0's slice of the original values; the frozen weight cast, not sharded."""
    from autograder.lab05_zero.workers import make_model, unit_numels

    got = student.run(shard_module_facts, world_size, param_dtype, units)
    model = make_model(seed=3, dtype=torch.float32)
    dtype = getattr(torch, param_dtype) if param_dtype else torch.float32
    inputs = describe(world_size=world_size, param_dtype=param_dtype, units=units)
    if units == "blocks":
        names = [f"blocks.{i}" for i in range(len(model.blocks))] + ["root"]
    else:
        names = ["root"]
    assert [g["name"] for g in got["groups"]] == names, f"shard_module groups {[g['name'] for g in got['groups']]}, " \
        f"expected {names} ({inputs})"
    numels = unit_numels(model) if units == "blocks" else {"root": sum(unit_numels(model).values())}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    listed = [n for g in got["groups"] for n in g["names"]]
    assert sorted(listed) == sorted(trainable), (
        f"shard_module must put every trainable parameter (a tied one once, no frozen one) in exactly one group; "
        f"got {len(listed)} names, expected {len(trainable)} ({inputs})")
    for group, master in zip(got["groups"], got["masters"]):
        padded = math.ceil(numels[group["name"]] / world_size) * world_size
        where = f"group {group['name']} ({inputs})"
        assert group["full_numel"] == padded and group["shard_numel"] == padded // world_size, (
            f"{where}: full has {group['full_numel']} elements, shard {group['shard_numel']}; expected {padded} "
            f"and {padded // world_size}")
        assert group["full_dtype"] == str(dtype), f"{where}: the flat buffer is {group['full_dtype']}, not {dtype}"
        assert group["params_are_views"], f"{where}: every parameter must become a view of the group's buffer"
        assert group["params_are_model_params"], f"{where}: params must be the model's own Parameter objects"
        assert group["shard_is_view"], f"{where}: the shard must be a view of the flat buffer (rank 0's slice)"
        assert group["masters_are_copies"], f"{where}: a master shard must have its own storage"
        originals = torch.cat([got["original"][n].reshape(-1) for n in group["names"]]
                              + [torch.zeros(padded - numels[group["name"]])])
        check_close(master, originals[: padded // world_size], name=f"shard_module master shard of {where}",
                    dtype="float32")
        check_close(group["full"], originals.to(dtype), name=f"shard_module flat buffer of {where}",
                    dtype="float64")
    assert got["master_dtypes"] == ["torch.float32"] * len(got["groups"]), (
        f"master shards must keep the model's dtype (float32): {got['master_dtypes']} ({inputs})")
    frozen_dtype, frozen = got["frozen"]
    assert frozen_dtype == str(dtype), f"the frozen parameter should be cast to {dtype}, it is {frozen_dtype}"
    check_close(frozen, model.blocks[0].attn_norm.weight.detach().to(dtype), name="frozen parameter after "
                "shard_module", inputs=inputs, dtype="float64")
    assert got["lm_head_is_embed"], "shard_module must keep the tied lm_head.weight and embed.weight one Parameter"
    for name, value in got["values"].items():
        check_close(value, got["original"][name].to(value.dtype), name=f"parameter {name} after shard_module",
                    inputs=inputs, dtype="float64")
