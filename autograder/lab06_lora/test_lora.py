"""Lab 06, part 1: the LoRA layer (lora.py): Eq. 3 forward and backward, peft's initialisation, the scale, dropout on
the adapter path, merge and unmerge, and a backward without the frozen weight's gradient GEMM.

Producers (above the tests) run in the grading worker; the tests compute what is expected here, in float64, from the
formula h = x W0^T + b + s (dropout(x) A^T) B^T, differentiated by torch's autograd.
"""

import math

import hf_models  # noqa: F401  (imports transformers once, before the worker forks)
import pytest
import torch
import torch.nn.functional as F

from common.testing import check_close, describe, random_tensor

# -----------------------------------------------------------------------------
# Cases: plain data, so the grader and the worker build the same layer


def _base_layer(case: dict) -> torch.nn.Module:
    """nn.Linear (weight (N, K)) or transformers' Conv1D (weight (K, N)), with seeded values."""
    from transformers.pytorch_utils import Conv1D

    K, N, dtype = case["in"], case["out"], case["dtype"]
    weight = random_tensor(N, K, seed=case["seed"], scale=K ** -0.5, dtype=dtype)  # (N, K)
    bias = random_tensor(N, seed=case["seed"] + 1, dtype=dtype) if case.get("bias", True) else None
    if case.get("kind", "linear") == "conv1d":
        layer = Conv1D(N, K).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.t())
            layer.bias.copy_(bias)
        return layer
    layer = torch.nn.Linear(K, N, bias=bias is not None).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _adapter(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (A (r, K), B (N, r)) in float64: B nonzero, so the update is not trivial."""
    r = case["config"]["r"]
    return (random_tensor(r, case["in"], seed=case["seed"] + 2, dtype=torch.float64, scale=0.3),
            random_tensor(case["out"], r, seed=case["seed"] + 3, dtype=torch.float64, scale=0.3))


def _scale(config: dict) -> float:
    alpha, r = config.get("alpha", 8.0), config["r"]
    return alpha / math.sqrt(r) if config.get("rank_stabilized") else alpha / r


def _expected(case: dict, *, stored: torch.dtype = torch.float64) -> dict:
    """Output and gradients from the formula in float64 (with the dropout mask the same RNG state draws), on the
    values as a layer in `stored` dtype holds them."""
    base = _base_layer({**case, "dtype": stored})
    W = base.weight.detach().t() if case.get("kind") == "conv1d" else base.weight.detach()  # (N, K)
    b = base.bias.detach() if base.bias is not None else torch.zeros(case["out"], dtype=stored)
    W, b = W.double(), b.double()
    A, B = (t.to(stored).double().requires_grad_(True) for t in _adapter(case))
    x = case["x"].to(stored).double().requires_grad_(True)
    p = case["config"].get("dropout", 0.0)
    torch.manual_seed(case.get("rng_seed", 0))
    keep = F.dropout(torch.ones_like(case["x"]), p, training=True).double() if p > 0 else 1.0  # mask / (1 - p)
    y = x @ W.t() + b + _scale(case["config"]) * ((x * keep) @ A.t()) @ B.t()
    (y * case["out_weights"].double()).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dA": A.grad, "dB": B.grad}


# -----------------------------------------------------------------------------
# Producers: run in the worker


def lora_step(case: dict) -> dict:
    """LoRALinear around the case's base layer, with the case's A and B: output, gradients, what trains."""
    from lab06_lora.lora import LoRAConfig, LoRALinear

    base = _base_layer(case)
    layer = LoRALinear(base, config=LoRAConfig(**case["config"]))
    A, B = _adapter(case)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    x = case["x"].clone().requires_grad_(True)
    torch.manual_seed(case.get("rng_seed", 0))
    y = layer(x)
    (y * case["out_weights"].to(y.dtype)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dA": layer.lora_A.weight.grad, "dB": layer.lora_B.weight.grad,
            "base_grads": [p.grad for p in base.parameters()],
            "trainable": sorted(n for n, p in layer.named_parameters() if p.requires_grad)}


def initial_adapter(case: dict) -> dict:
    """A and B as LoRALinear initialises them, and the layer's output at initialisation."""
    from lab06_lora.lora import LoRAConfig, LoRALinear

    base = _base_layer(case)
    torch.manual_seed(case["seed"])
    layer = LoRALinear(base, config=LoRAConfig(**case["config"]))
    with torch.no_grad():
        y = layer(case["x"])
    return {"A": layer.lora_A.weight.detach(), "B": layer.lora_B.weight.detach(), "y": y,
            "base_y": base(case["x"]).detach(), "training": layer.training}


def config_scalings(configs: list[dict]) -> list[float]:
    from lab06_lora.lora import LoRAConfig

    return [LoRAConfig(**config).scaling for config in configs]


def merge_round_trip(case: dict) -> dict:
    """Weights and outputs through merge, merge again, unmerge, unmerge again."""
    from lab06_lora.lora import LoRAConfig, LoRALinear

    base = _base_layer(case)
    layer = LoRALinear(base, config=LoRAConfig(**case["config"]))
    A, B = _adapter(case)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
        x = case["x"]
        out = {"y": layer(x), "w0": base.weight.detach().clone()}
        layer.merge()
        out.update(merged_w=base.weight.detach().clone(), merged_y=layer(x), merged_flag=layer.merged)
        layer.merge()
        out.update(twice_w=base.weight.detach().clone())
        layer.unmerge()
        out.update(unmerged_w=base.weight.detach().clone(), unmerged_y=layer(x), unmerged_flag=layer.merged)
        layer.unmerge()
        out.update(twice_unmerged_w=base.weight.detach().clone())
    return out


def flops_of_a_step(M: int, K: int, N: int, r: int) -> dict:
    """FLOPs of the matmuls of one LoRALinear forward and backward (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lab06_lora.lora import LoRAConfig, LoRALinear

    base = torch.nn.Linear(K, N)
    layer = LoRALinear(base, config=LoRAConfig(r=r))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = random_tensor(M, K, seed=5).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        layer(x).square().sum().backward()
    return {"flops": counter.get_total_flops(), "base_grad": base.weight.grad, "dA": layer.lora_A.weight.grad}


def bf16_paths(case: dict, mode: str) -> dict:
    """A bf16 layer with bf16 adapters ("bf16"), fp32 adapters on a bf16 base ("mixed"), or an fp32 layer under CPU
    bf16 autocast ("autocast")."""
    from lab06_lora.lora import LoRAConfig, LoRALinear

    dtype = torch.float32 if mode == "autocast" else torch.bfloat16
    base = _base_layer({**case, "dtype": dtype})
    adapter_dtype = torch.float32 if mode == "mixed" else None
    layer = LoRALinear(base, config=LoRAConfig(**case["config"], adapter_dtype=adapter_dtype))
    A, B = _adapter(case)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    x = case["x"].to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        y = layer(x)
        autocast_after = torch.is_autocast_enabled("cpu")
    (y.float() * case["out_weights"]).sum().backward()
    return {"y": y.detach(), "dA": layer.lora_A.weight.grad, "dB": layer.lora_B.weight.grad,
            "adapter_dtype": layer.lora_A.weight.dtype, "autocast_after": autocast_after}


def function_step(case: dict, separate_adapter_input: bool) -> dict:
    """LoRAFunction.apply on flattened inputs: with x' = x (None), or with a separate x' (dropout's output)."""
    from lab06_lora.lora import LoRAFunction

    base = _base_layer(case)
    A, B = (t.to(case["dtype"]).requires_grad_(True) for t in _adapter(case))
    x = case["x"].clone().requires_grad_(True)
    x_adapter = (x.detach() * 0.5).requires_grad_(True) if separate_adapter_input else None
    y = LoRAFunction.apply(x, x_adapter, base.weight, base.bias, A, B, _scale(case["config"]))
    (y * case["out_weights"]).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dx_adapter": None if x_adapter is None else x_adapter.grad,
            "dA": A.grad, "dB": B.grad, "base_grads": [p.grad for p in base.parameters()]}


def graph_of_forward(dtype: torch.dtype) -> list[str]:
    """Names of the autograd nodes behind a LoRALinear output."""
    from lab06_lora.lora import LoRAConfig, LoRALinear

    layer = LoRALinear(torch.nn.Linear(16, 8).to(dtype), config=LoRAConfig(r=2))
    y = layer(random_tensor(3, 16, seed=1, dtype=dtype).requires_grad_(True))
    names, frontier = [], [y.grad_fn]
    while frontier:
        node = frontier.pop()
        if node is not None:
            names.append(type(node).__name__)
            frontier.extend(next_node for next_node, _ in node.next_functions)
    return names


def bad_config(**fields) -> None:
    from lab06_lora.lora import LoRAConfig

    LoRAConfig(**fields)


def wrap_non_linear() -> None:
    from lab06_lora.lora import LoRAConfig, LoRALinear

    LoRALinear(torch.nn.Embedding(10, 4), config=LoRAConfig(r=2))


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _case(kind="linear", *, K, N, x_shape, seed, config, dtype=torch.float64, bias=True, rng_seed=0):
    x = random_tensor(*x_shape, K, seed=seed + 10, dtype=dtype)
    return {"kind": kind, "in": K, "out": N, "bias": bias, "dtype": dtype, "seed": seed, "config": config,
            "x": x, "out_weights": random_tensor(*x_shape, N, seed=seed + 11), "rng_seed": rng_seed}


STEP_CASES = {
    "linear, bias, fp64": _case(K=37, N=23, x_shape=(3, 4), seed=1, config=dict(r=5, alpha=7.0)),
    "linear, no bias, rsLoRA, 2-D input": _case(K=37, N=23, x_shape=(6,), seed=2, bias=False,
                                                 config=dict(r=9, alpha=3.0, rank_stabilized=True)),
    "Conv1D (GPT-2 layout)": _case("conv1d", K=20, N=31, x_shape=(2, 5), seed=3, config=dict(r=3, alpha=5.0)),
    "linear, fp32": _case(K=33, N=17, x_shape=(4, 3), seed=4, dtype=torch.float32, config=dict(r=4, alpha=8.0)),
    "dropout 0.4": _case(K=19, N=13, x_shape=(3, 5), seed=5, config=dict(r=3, alpha=4.0, dropout=0.4), rng_seed=9),
}


@pytest.mark.points(4)
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_forward_and_backward_match_the_formula(student, name):
    """h = x W0^T + b + s (dropout(x) A^T) B^T and its gradients for x, A and B, against float64 autograd on the
    formula; the base layer gets no gradient and only lora_A and lora_B train."""
    case = STEP_CASES[name]
    got = student.run(lora_step, case)
    want = _expected(case)
    inputs = describe(x=case["x"], layer=name, **case["config"])
    for key in ("y", "dx", "dA", "dB"):
        check_close(got[key], want[key].to(case["dtype"]), name=f"LoRALinear ({name}): {key}", inputs=inputs)
    assert all(g is None for g in got["base_grads"]), (
        f"LoRALinear ({name}): the base layer's weight or bias received a gradient; W0 and b must be frozen")
    assert got["trainable"] == ["lora_A.weight", "lora_B.weight"], (
        f"LoRALinear ({name}): trainable parameters are {got['trainable']}, expected only lora_A.weight and "
        "lora_B.weight")


@pytest.mark.points(2)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_initialisation_like_peft(student, kind):
    """A ~ U(-1/sqrt(K), 1/sqrt(K)) (kaiming_uniform_ with a = sqrt(5), fan-in K), B = 0, so the layer starts as
    its base layer; A is (r, K), B is (N, r), in the base's dtype."""
    K, N, r = 400, 30, 8
    case = _case(kind, K=K, N=N, x_shape=(3,), seed=6, config=dict(r=r, alpha=16.0))
    got = student.run(initial_adapter, case)
    A, B = got["A"], got["B"]
    assert tuple(A.shape) == (r, K) and tuple(B.shape) == (N, r), (
        f"LoRALinear(in {K}, out {N}, r {r}): A is {tuple(A.shape)} and B {tuple(B.shape)}, expected ({r}, {K}) "
        f"and ({N}, {r})")
    assert A.dtype == torch.float64 and B.dtype == torch.float64, f"adapters are {A.dtype}, the base is float64"
    assert torch.count_nonzero(B) == 0, "LoRALinear: B must start at zero (so training starts at the base model)"
    bound = 1 / math.sqrt(K)
    largest = A.abs().max().item()
    assert 0.97 * bound < largest <= bound * (1 + 1e-12), (
        f"LoRALinear: max |A| is {largest:.4g}; peft's init draws A from U(-1/sqrt(K), 1/sqrt(K)) with K = "
        f"in_features = {K}, i.e. bound {bound:.4g}")
    std = A.std().item()
    assert abs(std - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3), (
        f"LoRALinear: A's standard deviation {std:.4g} is not that of U(-b, b) with b = {bound:.4g} "
        f"({bound / math.sqrt(3):.4g})")
    check_close(got["y"], got["base_y"], name="LoRALinear at initialisation (output vs the base layer's)",
                inputs=describe(x=case["x"]), rtol=0, atol=0)


@pytest.mark.points(1)
def test_scaling_alpha_over_r_or_sqrt_r(student):
    """s = alpha / r, or alpha / sqrt(r) with rank_stabilized (rsLoRA)."""
    configs = [dict(r=4, alpha=6.0), dict(r=4, alpha=6.0, rank_stabilized=True), dict(r=9, alpha=3.0),
               dict(r=9, alpha=3.0, rank_stabilized=True), dict(r=1, alpha=5.0, rank_stabilized=True)]
    got = student.run(config_scalings, configs)
    want = [_scale(c) for c in configs]
    assert got == pytest.approx(want, rel=1e-12), f"LoRAConfig.scaling for {configs} gave {got}, expected {want}"


MERGE_CASES = {
    "linear, fp64": _case(K=21, N=18, x_shape=(5,), seed=7, config=dict(r=4, alpha=6.0)),
    "Conv1D, fp64": _case("conv1d", K=14, N=25, x_shape=(2, 3), seed=8, config=dict(r=2, alpha=3.0)),
    "linear, fp32, rsLoRA": _case(K=40, N=24, x_shape=(4,), seed=9, dtype=torch.float32,
                                  config=dict(r=6, alpha=4.0, rank_stabilized=True)),
}


@pytest.mark.points(3)
@pytest.mark.parametrize("name", list(MERGE_CASES))
def test_merge_and_unmerge_round_trip(student, name):
    """merge() sets W0 + s B A (transposed for Conv1D) and the merged layer gives the same output; merging twice
    changes nothing; unmerge() restores W0, and unmerging twice changes nothing."""
    case = MERGE_CASES[name]
    got = student.run(merge_round_trip, case)
    A, B = _adapter(case)
    delta = _scale(case["config"]) * B @ A  # (N, K)
    delta = delta.t() if case["kind"] == "conv1d" else delta
    inputs = describe(x=case["x"], layer=name, **case["config"])
    check_close(got["merged_w"], got["w0"].double() + delta, name=f"merge ({name}): the merged weight",
                inputs=inputs, dtype=case["dtype"])
    check_close(got["merged_y"], got["y"], name=f"merge ({name}): output of the merged layer", inputs=inputs)
    assert got["merged_flag"] is True and got["unmerged_flag"] is False, "LoRALinear.merged must follow merge/unmerge"
    check_close(got["twice_w"], got["merged_w"], name=f"merge twice ({name}): the weight", inputs=inputs,
                rtol=0, atol=0)
    check_close(got["unmerged_w"], got["w0"], name=f"unmerge ({name}): the restored weight", inputs=inputs)
    check_close(got["unmerged_y"], got["y"], name=f"unmerge ({name}): output", inputs=inputs)
    check_close(got["twice_unmerged_w"], got["unmerged_w"], name=f"unmerge twice ({name}): the weight",
                inputs=inputs, rtol=0, atol=0)


@pytest.mark.points(3)
def test_backward_skips_the_frozen_weights_gradient_gemm(student):
    """One forward and backward costs the frozen weight two GEMMs (x W0^T, then dL/dx = g W0), not three: no
    dL/dW0 = g^T x is computed. Counted with torch's FlopCounterMode."""
    M, K, N, r = 64, 96, 80, 4
    got = student.run(flops_of_a_step, M, K, N, r)
    base_gemms = 2 * (2 * M * K * N)  # forward and dL/dx
    adapter_gemms = 2 * M * r * (K + N)  # x A^T and h B^T
    ceiling = base_gemms + 4 * adapter_gemms  # forward and the four thin backward products, with room to spare
    assert got["base_grad"] is None, "LoRALinear: the frozen weight got a gradient"
    assert got["dA"] is not None, "LoRALinear: lora_A got no gradient"
    assert base_gemms <= got["flops"] <= ceiling, (
        f"LoRALinear (M {M}, K {K}, N {N}, r {r}): a forward and backward took {got['flops']:,} FLOPs; the two base "
        f"GEMMs take {base_gemms:,} and the adapters at most {ceiling - base_gemms:,}. A dL/dW0 GEMM would add "
        f"{2 * M * K * N:,}: the frozen weight needs no gradient")


@pytest.mark.points(2)
@pytest.mark.parametrize("mode", ["bf16", "mixed", "autocast"])
def test_bf16_mixed_and_autocast(student, mode):
    """In bf16 (bf16 adapters), with fp32 adapters on a bf16 base (peft's default), and under CPU bf16 autocast: the
    output is bf16 and within bf16 error of the float64 formula, the adapter gradients too, and autocast is left as
    it was."""
    case = _case(K=48, N=40, x_shape=(2, 6), seed=12, config=dict(r=4, alpha=8.0))
    got = student.run(bf16_paths, case, mode)
    want = _expected(case, stored=torch.bfloat16)  # the formula on the bf16 values of x, W0, b, A and B
    inputs = describe(x=case["x"], mode=mode)
    assert got["y"].dtype == torch.bfloat16, f"LoRALinear ({mode}): output is {got['y'].dtype}, expected bfloat16"
    assert got["adapter_dtype"] == (torch.float32 if mode != "bf16" else torch.bfloat16), (
        f"LoRALinear ({mode}): adapters are {got['adapter_dtype']}")
    # bf16 rounds the intermediate h = x A^T and the output: an error relative to the output's scale
    check_close(got["y"], want["y"], name=f"LoRALinear ({mode}): output", inputs=inputs, rtol=1.6e-2,
                atol=1e-2 * want["y"].abs().max().item())
    for key in ("dA", "dB"):
        error = (got[key].double() - want[key]).norm() / want[key].norm()
        assert error < 3e-2, f"LoRALinear ({mode}): {key} is off by {error:.2e} (relative norm) on {inputs}"
    assert got["autocast_after"] is (mode == "autocast"), f"LoRALinear ({mode}) changed the autocast state"


FUNCTION_CASE = _case(K=27, N=15, x_shape=(11,), seed=13, config=dict(r=3, alpha=5.0))


@pytest.mark.points(2)
@pytest.mark.parametrize("separate", [False, True], ids=["x' = x", "x' given"])
def test_lora_function_backward_written_out(student, separate):
    """LoRAFunction: dL/dx = g W0 (+ s (g B) A when x' = x), dL/dx' = s (g B) A, dL/dA = s (g B)^T x',
    dL/dB = s g^T (x' A^T); nothing for W0 and b. Against float64 autograd on the formula."""
    case = FUNCTION_CASE
    got = student.run(function_step, case, separate)
    base = _base_layer(case)
    A, B = (t.clone().requires_grad_(True) for t in _adapter(case))
    x = case["x"].clone().requires_grad_(True)
    x_adapter = (x.detach() * 0.5).requires_grad_(True) if separate else x
    y = x @ base.weight.detach().t() + base.bias.detach() + _scale(case["config"]) * (x_adapter @ A.t()) @ B.t()
    (y * case["out_weights"]).sum().backward()
    inputs = describe(x=x, separate_adapter_input=separate, **case["config"])
    check_close(got["y"], y.detach(), name="LoRAFunction: output", inputs=inputs)
    check_close(got["dx"], x.grad, name="LoRAFunction: dL/dx", inputs=inputs)
    if separate:
        check_close(got["dx_adapter"], x_adapter.grad, name="LoRAFunction: dL/dx'", inputs=inputs)
    check_close(got["dA"], A.grad, name="LoRAFunction: dL/dA", inputs=inputs)
    check_close(got["dB"], B.grad, name="LoRAFunction: dL/dB", inputs=inputs)
    assert all(g is None for g in got["base_grads"]), "LoRAFunction gave the frozen weight or bias a gradient"


@pytest.mark.points(1)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_same_dtype_inputs_take_the_lora_function(student, dtype):
    """When x, W0 and the adapters share a dtype (and autocast is off), LoRALinear runs LoRAFunction: the fast path
    the benchmark times."""
    names = student.run(graph_of_forward, dtype)
    assert any("LoRAFunction" in name for name in names), (
        f"LoRALinear ({dtype}): the output's autograd graph {names} has no LoRAFunction node; same-dtype inputs "
        "should take the fast path")


@pytest.mark.points(1)
@pytest.mark.parametrize("fields, match", [
    (dict(r=0), "r"), (dict(r=-3), "r"), (dict(r=2.5), "r"), (dict(r=4, dropout=1.0), "dropout"),
    (dict(r=4, dropout=-0.1), "dropout"), (dict(r=4, alpha=0.0), "alpha"),
])
def test_bad_config_is_refused(student, fields, match):
    """A rank that is not a positive integer, dropout outside [0, 1), alpha <= 0: ValueError naming the field."""
    with pytest.raises(ValueError, match=match):
        student.run(bad_config, **fields)


@pytest.mark.points(1)
def test_non_linear_base_is_refused(student):
    with pytest.raises(TypeError, match="Embedding"):
        student.run(wrap_non_linear)
