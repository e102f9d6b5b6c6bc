"""Lab 04, part 1: Megatron-LM tensor parallelism (tensor_parallel.py).

The ranks run the student's modules on seeded inputs (workers.py); here the grader computes the single-process result
with common.model and torch, and compares outputs and the gradients gathered from the ranks.
"""

import pytest
import torch

from autograder.lab04_model_parallel.workers import (assemble, block_config, block_inputs, full_block, operator_inputs,
                                                     tp_blocks, tp_ops)
from common.model import rope_tables
from common.testing import check_close, describe

BLOCK_CASES = [
    {"heads": 4, "kv_heads": 2, "width": 64},  # GQA: K/V heads split at t = 2, copied at t = 4
    {"heads": 4, "kv_heads": 1, "width": 32, "ffn": 40},  # MQA: the one K/V head copied on every rank
    {"heads": 8, "kv_heads": 8, "width": 64, "ffn": 48},  # MHA: everything split
]


def _linear_expectations(data: dict, t: int) -> dict:
    """Single-process column- and row-parallel layers: outputs and gradients, fp64."""
    out = {}
    for gather in (False, True):
        x = data["col_x"].clone().requires_grad_()
        w, b = data["col_w"].clone().requires_grad_(), data["col_b"].clone().requires_grad_()
        y = torch.nn.functional.linear(x, w, b)
        (y * data["col_r"]).sum().backward()
        out[f"column gather={gather}"] = {"y": y.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}
    x = data["row_x"].clone().requires_grad_()
    w, b = data["row_w"].clone().requires_grad_(), data["row_b"].clone().requires_grad_()
    y = torch.nn.functional.linear(x, w, b)
    (y * data["row_r"]).sum().backward()
    out["row"] = {"y": y.detach(), "dx": x.grad, "dw": w.grad, "db": b.grad}
    return out


def _block_expectations(case: dict, seed: int, index: int) -> dict:
    config = block_config(case)
    full = full_block(case, seed + index)
    cos, sin = (table.double() for table in rope_tables(config.head_dim, 32, config.rope_theta))
    x0, weight = block_inputs(case, seed + 100 + index)
    out = {}
    for part, module in (("mlp", full.mlp), ("attn", full.attn), ("block", full)):
        module.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = module(x) if part == "mlp" else module(x, cos, sin)
        (y * weight).sum().backward()
        out[part] = {"y": y.detach(), "dx": x.grad,
                     "grads": {name: p.grad for name, p in module.named_parameters()}}
    return out


def _check_calls(calls: list, *, expected_big: int, activation_bytes: int, allow_small: bool, what: str) -> None:
    """Exactly `expected_big` all-reduces of the activation's size; other collectives only where allowed."""
    big = [c for c in calls if c[0] == "all_reduce" and c[1] == activation_bytes]
    others = [c for c in calls if c not in big]
    assert len(big) == expected_big, (
        f"{what}: {len(big)} all-reduces of a (B, N, C) activation ({activation_bytes} bytes), expected "
        f"{expected_big}; collectives called: {[(name, nbytes) for name, nbytes, _ in calls]}")
    if not allow_small:
        assert not others, f"{what}: unexpected collectives {[(name, nbytes) for name, nbytes, _ in others]}"
    assert all(c[0] == "all_reduce" for c in others), (
        f"{what}: only all-reduces are expected, got {[name for name, _, _ in others]}")


@pytest.mark.points(8)
@pytest.mark.time_limit(200)
@pytest.mark.parametrize("world_size", [2, 4])
def test_mlp_attention_and_block(student, world_size):
    """ParallelSwiGLU, ParallelAttention (GQA heads split or copied, MQA, MHA) and ParallelBlock give the
    single-process outputs and input gradients; the parameter gradients gathered from the ranks equal the full ones
    (copies of a K/V head agree); the MLP and the attention each make one activation all-reduce forward and one
    backward."""
    got = student.run(tp_blocks, world_size, BLOCK_CASES, 11)
    t = world_size
    for index, case in enumerate(BLOCK_CASES):
        config = block_config(case)
        want = _block_expectations(case, 11, index)
        activation = 2 * 7 * case["width"] * 8
        copies = config.num_kv_heads < t
        for part, cls in (("mlp", "ParallelSwiGLU"), ("attn", "ParallelAttention"), ("block", "ParallelBlock")):
            where = describe(world_size=t, heads=case["heads"], kv_heads=case["kv_heads"], width=case["width"],
                             ffn=config.hidden_width, x=(2, 7, case["width"]))
            for r, out in enumerate(got):
                part_out = out[index][part]
                check_close(part_out["y"], want[part]["y"], name=f"{cls} output on rank {r}", inputs=where)
                check_close(part_out["dx"], want[part]["dx"], name=f"{cls} input gradient on rank {r}", inputs=where)
            for name, full in want[part]["grads"].items():
                shards = [out[index][part]["grads"].get(name) for out in got]
                assert all(s is not None for s in shards), f"{cls}: no gradient for {name} on some rank ({where})"
                check_close(assemble(name, shards, config, t), full,
                            name=f"{cls} gradient of {name}, gathered from the ranks", inputs=where)
            for r, out in enumerate(got):
                fwd, bwd = out[index][part]["forward_calls"], out[index][part]["backward_calls"]
                per_layer = 2 if part == "block" else 1
                _check_calls(fwd, expected_big=per_layer, activation_bytes=activation, allow_small=False,
                             what=f"{cls} forward on rank {r} ({where})")
                _check_calls(bwd, expected_big=per_layer, activation_bytes=activation,
                             allow_small=copies and part != "mlp", what=f"{cls} backward on rank {r} ({where})")


def check_errors(errors: dict, t: int, rank: int) -> None:
    """Each size t does not divide raised ValueError naming the size and t."""
    bad = str(errors["bad"])
    for key, number in (("column", bad), ("row", bad), ("heads", bad), ("kv_heads", str(errors["kv_heads_used"])),
                        ("ffn", bad)):
        message = errors[key]
        assert message.startswith("ValueError"), (
            f"{key}: a size the tensor-parallel size ({t}) does not divide should raise ValueError on rank {rank}, "
            f"got: {message}")
        assert number in message and str(t) in message.replace(number, ""), (
            f"{key}: the error should name the size ({number}) and the tensor-parallel size ({t}): {message}")


@pytest.mark.points(6)
@pytest.mark.time_limit(200)
@pytest.mark.parametrize("world_size", [2, 4])
def test_operators_linear_layers_and_errors(student, world_size):
    """f (identity forward, all-reduce backward), g (all-reduce forward, identity backward), the all-gather, and
    column-parallel (with and without gathering, with a bias) and row-parallel linears (bias added once), against
    F.linear on one process; sizes t does not divide (out_features, in_features, num_heads, num_kv_heads when
    neither divides the other, the FFN width) raise ValueError naming both numbers."""
    got = student.run(tp_ops, world_size, 5)
    t, data = world_size, operator_inputs(5, world_size)
    want = _linear_expectations(data, t)
    for r, out in enumerate(got):
        where = describe(world_size=t, rank=r)
        check_close(out["f_forward"], data["x"], name="copy_to_tp (f) forward: the input unchanged", inputs=where)
        check_close(out["f_grad"], sum(data["f_weights"]), name="copy_to_tp (f) backward: the ranks' gradients "
                    "summed", inputs=where)
        check_close(out["f_grad_of_sum"], torch.full_like(data["x"], float(t)),
                    name="copy_to_tp (f) backward of y.sum() (an expanded gradient)", inputs=where)
        check_close(out["g_forward"], sum(data["g_inputs"]), name="reduce_from_tp (g) forward: the ranks' inputs "
                    "summed", inputs=where)
        check_close(out["g_input_after"], data["g_inputs"][r], name="reduce_from_tp (g): the input tensor must not be "
                    "changed in place", inputs=where)
        check_close(out["g_grad"], data["g_weight"], name="reduce_from_tp (g) backward: the gradient unchanged",
                    inputs=where)
        check_close(out["gather_forward"], torch.cat(data["gather_inputs"], dim=-1),
                    name="gather_from_tp forward: slices concatenated in rank order", inputs=where)
        check_close(out["gather_grad"], data["gather_weight"][:, 3 * r:3 * r + 3],
                    name="gather_from_tp backward: this rank's slice of the gradient", inputs=where)
        rows = 5
        for gather in (False, True):
            key, expect = f"column gather={gather}", want[f"column gather={gather}"]
            layer = f"ColumnParallelLinear(6, {5 * t}, gather_output={gather}, bias=True)"
            y = expect["y"] if gather else expect["y"][..., r * rows:(r + 1) * rows]
            check_close(out[key]["y"], y, name=f"{layer} output", inputs=where)
            check_close(out[key]["dx"], expect["dx"], name=f"{layer} input gradient (f sums the ranks' parts)",
                        inputs=where)
            check_close(out[key]["dw"], expect["dw"][r * rows:(r + 1) * rows], name=f"{layer} weight gradient "
                        "(this rank's rows)", inputs=where)
            check_close(out[key]["db"], expect["db"][r * rows:(r + 1) * rows], name=f"{layer} bias gradient",
                        inputs=where)
        layer, expect = f"RowParallelLinear({3 * t}, 5, bias=True)", want["row"]
        check_close(out["row"]["y"], expect["y"], name=f"{layer} output (partial sums all-reduced, bias added once)",
                    inputs=where)
        check_close(out["row"]["dx"], expect["dx"][..., 3 * r:3 * r + 3], name=f"{layer} input gradient (this rank's "
                    "slice)", inputs=where)
        check_close(out["row"]["dw"], expect["dw"][:, 3 * r:3 * r + 3], name=f"{layer} weight gradient (this rank's "
                    "columns)", inputs=where)
        check_close(out["row"]["db"], expect["db"], name=f"{layer} bias gradient", inputs=where)
        check_errors(out["errors"], t, r)
