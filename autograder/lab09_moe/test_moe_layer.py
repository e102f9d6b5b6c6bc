"""Lab 09, part 4: the MoE layer (moe_layer.py) against a dense per-expert loop, and against Hugging Face's Mixtral.

The grader's layer (expected.dense_moe) runs every expert on every token in float64 and weights the results with a
(T, E) combine matrix built one token at a time from the routing rules; gradients come from autograd through it.
"""

import pytest
import torch

from common.testing import check_all_close, check_close, describe, random_tensor

WIDTH, FFN = 12, 10


# -----------------------------------------------------------------------------
# Producers: run in the worker


def layer_of(weights: dict, config: dict, x: torch.Tensor, seed: int, device: str = "cpu") -> dict:
    """The student's MoELayer with the grader's weights: output, gradients of a probe, losses and counts."""
    from lab09_moe.moe_layer import MoEConfig, MoELayer

    layer = MoELayer(x.shape[-1], MoEConfig(**config)).to(device=device, dtype=x.dtype)
    layer.load_state_dict({name: value.to(x.dtype) for name, value in weights.items()})
    x = x.to(device).requires_grad_(True)
    y = layer(x)
    probe = random_tensor(*y.shape, dtype=y.dtype, seed=seed).to(device)
    ((y * probe).sum() + 0.3 * layer.aux_loss + 0.2 * layer.z_loss).backward()
    grads = {name: p.grad.cpu() for name, p in layer.named_parameters()}
    return {"y": y.detach().cpu(), "dx": x.grad.cpu(), "grads": grads, "aux": layer.aux_loss.detach().cpu(),
            "z": layer.z_loss.detach().cpu(), "counts": layer.counts.cpu()}


def mixtral_layer_of(state: dict, config: dict, x: torch.Tensor, seed: int) -> dict:
    """The student's layer loaded from a MixtralSparseMoeBlock's state dict with load_mixtral_weights."""
    from lab09_moe.moe_layer import MoEConfig, MoELayer, load_mixtral_weights

    layer = MoELayer(x.shape[-1], MoEConfig(**config))
    returned = load_mixtral_weights(layer, state)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * random_tensor(*y.shape, seed=seed)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "router": layer.router.weight.grad, "aux": layer.aux_loss.detach(),
            "returned_self": returned is layer}


def edge_configs() -> list:
    """Configurations at the edges of what is allowed; each must construct without error."""
    from lab09_moe.moe_layer import MoEConfig

    made = [MoEConfig(num_experts=1, top_k=1, ffn_width=1, capacity_factor=1e-3, aux_loss_coef=0.0, z_loss_coef=0.0),
            MoEConfig(num_experts=3, top_k=3, routing="expert_choice", backend="torch", renormalize=False)]
    return [(c.num_experts, c.top_k, c.ffn_width, c.routing, c.backend) for c in made]


def raise_for(case: str) -> None:
    from lab09_moe.moe_layer import MoEConfig, MoELayer, load_mixtral_weights

    if case == "top_k_too_large":
        MoEConfig(num_experts=4, top_k=5)
    elif case == "top_k_zero":
        MoEConfig(num_experts=4, top_k=0)
    elif case == "no_experts":
        MoEConfig(num_experts=0, top_k=1)
    elif case == "capacity_factor":
        MoEConfig(capacity_factor=-0.5)
    elif case == "capacity_factor_zero":
        MoEConfig(capacity_factor=0.0)
    elif case == "mixtral_shapes":
        layer = MoELayer(8, MoEConfig(num_experts=2, top_k=1, ffn_width=4, backend="torch"))
        load_mixtral_weights(layer, {"gate.weight": torch.zeros(2, 8), "experts.gate_up_proj": torch.zeros(2, 10, 8),
                                     "experts.down_proj": torch.zeros(2, 8, 5)})
    elif case == "routing":
        MoEConfig(routing="random")
    elif case == "backend":
        MoEConfig(backend="cuda")
    elif case == "negative_coef":
        MoEConfig(aux_loss_coef=-0.1)
    elif case == "negative_z_coef":
        MoEConfig(z_loss_coef=-0.1)
    elif case == "no_ffn":
        MoEConfig(ffn_width=0)
    elif case == "dtype":
        MoELayer(8, MoEConfig(num_experts=2, top_k=1, ffn_width=4, backend="torch"))(torch.ones(3, 8,
                                                                                               dtype=torch.float64))
    elif case == "width":
        MoELayer(8, MoEConfig(num_experts=2, top_k=1, ffn_width=4, backend="torch"))(torch.ones(3, 6))


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _expected(weights: dict, x: torch.Tensor, seed: int, **routing) -> dict:
    """The grader's layer on the same weights, and the same probe loss."""
    from autograder.lab09_moe.expected import DenseMoE

    layer = DenseMoE(weights, **routing)
    leaf = x.double().clone().requires_grad_(True)
    y = layer(leaf)
    probe = random_tensor(*y.shape, dtype=torch.float64, seed=seed)
    ((y * probe).sum() + 0.3 * layer.aux + 0.2 * layer.z).backward()
    grads = {"router.weight": layer.router.weight.grad, "w_gate_up": layer.w_gate_up.grad,
             "w_down": layer.w_down.grad}
    return {"y": y.detach(), "dx": leaf.grad, "grads": grads, "aux": layer.aux.detach(), "z": layer.z.detach()}


def _routed_counts(weights: dict, x: torch.Tensor, top_k: int) -> torch.Tensor:
    from autograder.lab09_moe.expected import probabilities, ranked_experts

    logits = x.reshape(-1, x.shape[-1]).double() @ weights["router.weight"].t()
    choices = ranked_experts(probabilities(logits), top_k)
    return torch.bincount(torch.tensor(choices).flatten(), minlength=weights["router.weight"].shape[0])


LAYER_CASES = {
    "mixtral top-2": dict(num_experts=5, top_k=2, renormalize=True, capacity_factor=None),
    "switch top-1, capacity 1.0": dict(num_experts=4, top_k=1, renormalize=False, capacity_factor=1.0),
    "top-3 of 6, capacity 0.5": dict(num_experts=6, top_k=3, renormalize=True, capacity_factor=0.5),
}


@pytest.mark.points(6)
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_matches_the_dense_loop(student, name):
    """Output, the gradients of x, the router and both expert weights, the aux and z losses and the routed counts,
    for Mixtral's top-2, a Switch top-1 layer that drops tokens, and top-3 at capacity factor 0.5 (float64, the
    per-expert torch backend)."""
    from autograder.lab09_moe.expected import moe_weights

    case = LAYER_CASES[name]
    E, k = case["num_experts"], case["top_k"]
    weights = moe_weights(num_experts=E, width=WIDTH, ffn_width=FFN, seed=E * 10 + k)
    x = random_tensor(2, 7, WIDTH, dtype=torch.float64, seed=k)
    config = dict(case, ffn_width=FFN, backend="torch")
    got = student.run(layer_of, weights, config, x, 4)
    want = _expected(weights, x, 4, top_k=k, renormalize=case["renormalize"],
                     capacity_factor=case["capacity_factor"])
    inputs = describe(x=x, **case)
    check_close(got["y"], want["y"], name=f"MoELayer {name} (output)", inputs=inputs)
    check_close(got["dx"], want["dx"], name=f"MoELayer {name} (gradient of x)", inputs=inputs)
    check_all_close(got["grads"], want["grads"], name=f"MoELayer {name} (parameter gradients)", inputs=inputs)
    check_close(got["aux"], want["aux"], name=f"MoELayer {name} (aux_loss)", inputs=inputs)
    check_close(got["z"], want["z"], name=f"MoELayer {name} (z_loss)", inputs=inputs)
    counts = _routed_counts(weights, x, k)
    assert torch.equal(got["counts"].cpu(), counts), (
        f"MoELayer {name}: counts {got['counts'].tolist()}, expected {counts.tolist()} (assignments routed to each "
        "expert, before capacity drops)")


@pytest.mark.points(2)
def test_dropped_tokens_leave_the_layer_as_zero(student):
    """With capacity 1 per expert (cf = 0.25, k = 1, T = 16, E = 4), at most 4 tokens are served; every other
    token's output row is exactly zero, so in a block h + MoE(norm(h)) it passes through the residual."""
    from autograder.lab09_moe.expected import moe_weights

    weights = moe_weights(num_experts=4, width=WIDTH, ffn_width=FFN, seed=3)
    x = random_tensor(16, WIDTH, dtype=torch.float64, seed=3)
    config = dict(num_experts=4, top_k=1, ffn_width=FFN, renormalize=False, capacity_factor=0.25, backend="torch")
    got = student.run(layer_of, weights, config, x, 1)
    want = _expected(weights, x, 1, top_k=1, renormalize=False, capacity_factor=0.25)
    served = int((want["y"].abs().sum(dim=-1) > 0).sum())
    zero_rows = int((got["y"].abs().sum(dim=-1) == 0).sum())
    assert zero_rows == 16 - served, (
        f"MoELayer with capacity 1 per expert: {zero_rows} of 16 output rows are zero, expected {16 - served} "
        "(the tokens whose assignment was dropped)")
    check_close(got["y"], want["y"], name="MoELayer with capacity 1 (output)", inputs=describe(x=x, **config))


@pytest.mark.points(3)
def test_expert_choice_layer(student):
    """routing="expert_choice": each expert runs its ceil(cf k T / E) best tokens (cf = 1.0, k = 2, T = 9, E = 3:
    6 each), weighted by their softmax score; no balancing loss (aux = 0)."""
    from autograder.lab09_moe.expected import moe_weights

    weights = moe_weights(num_experts=3, width=WIDTH, ffn_width=FFN, seed=17)
    x = random_tensor(9, WIDTH, dtype=torch.float64, seed=17)
    config = dict(num_experts=3, top_k=2, ffn_width=FFN, routing="expert_choice", backend="torch")
    got = student.run(layer_of, weights, config, x, 2)
    want = _expected(weights, x, 2, top_k=2, routing="expert_choice")
    inputs = describe(x=x, **config)
    check_close(got["y"], want["y"], name="MoELayer expert choice (output)", inputs=inputs)
    check_close(got["dx"], want["dx"], name="MoELayer expert choice (gradient of x)", inputs=inputs)
    check_all_close(got["grads"], want["grads"], name="MoELayer expert choice (parameter gradients)", inputs=inputs)
    assert float(got["aux"]) == 0.0, f"expert choice needs no balancing loss: aux_loss should be 0, got {got['aux']}"
    assert got["counts"].tolist() == [6, 6, 6], f"expert choice: counts {got['counts'].tolist()}, expected [6, 6, 6]"


@pytest.mark.points(3)
@pytest.mark.time_limit(120)
def test_layer_on_the_triton_backend(student):
    """backend="triton" (the grouped GEMM; fp32): the same output and gradients as the dense loop."""
    from autograder.lab09_moe.expected import moe_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = moe_weights(num_experts=4, width=16, ffn_width=16, seed=23)
    x = random_tensor(11, 16, dtype=torch.float32, seed=23)
    config = dict(num_experts=4, top_k=2, ffn_width=16, backend="triton")
    got = student.run(layer_of, weights, config, x, 5, device)
    want = _expected(weights, x, 5, top_k=2)
    inputs = describe(x=x, **config, device=device)
    check_close(got["y"], want["y"], name="MoELayer on the Triton backend (output)", inputs=inputs, atol=1e-5)
    check_close(got["dx"], want["dx"], name="MoELayer on the Triton backend (gradient of x)", inputs=inputs,
                atol=1e-5)
    check_all_close(got["grads"], want["grads"], name="MoELayer on the Triton backend (parameter gradients)",
                    inputs=inputs, atol=1e-5)


@pytest.mark.points(4)
def test_equivalent_to_hugging_face_mixtral(student):
    """transformers' MixtralSparseMoeBlock (built from a config, random weights) and the student's layer loaded with
    load_mixtral_weights: the same output and gradients (fp32), and HF's load_balancing_loss_func = k * aux_loss."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

    E, k, C, F = 6, 2, 16, 20
    hf_config = MixtralConfig(hidden_size=C, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                              router_jitter_noise=0.0)
    hf_config._experts_implementation = "eager"  # HF's own per-expert loop (the layer is used on its own)
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(hf_config)
    with torch.no_grad():
        for index, param in enumerate(block.parameters()):
            param.copy_(random_tensor(*param.shape, seed=100 + index, scale=0.3))
    x = random_tensor(2, 5, C, seed=31)
    leaf = x.clone().requires_grad_(True)
    y = block(leaf)
    (y * random_tensor(*y.shape, seed=6)).sum().backward()
    logits = x.reshape(-1, C) @ block.gate.weight.detach().t()
    hf_aux = load_balancing_loss_func((logits,), E, k)

    config = dict(num_experts=E, top_k=k, ffn_width=F, backend="torch")
    state = {name: value.detach().clone() for name, value in block.state_dict().items()}
    got = student.run(mixtral_layer_of, state, config, x, 6)
    inputs = describe(x=x, num_experts=E, top_k=k, ffn_width=F)
    assert got["returned_self"], "load_mixtral_weights should return the layer it filled"
    # both sides compute in fp32, in different orders: fp32 rounding over sums of ~20 terms
    check_close(got["y"], y.detach(), name="MoELayer vs MixtralSparseMoeBlock (output)", inputs=inputs, rtol=1e-4,
                atol=1e-6)
    check_close(got["dx"], leaf.grad, name="MoELayer vs MixtralSparseMoeBlock (gradient of x)", inputs=inputs,
                rtol=1e-4, atol=1e-6)
    check_close(got["router"], block.gate.weight.grad, name="MoELayer vs Mixtral (gradient of the router)",
                inputs=inputs, rtol=1e-4, atol=1e-6)
    check_close(k * got["aux"].float(), hf_aux.detach().float(), name="k * aux_loss vs HF load_balancing_loss_func",
                inputs=inputs, rtol=1e-5, atol=1e-6)


@pytest.mark.points(1)
def test_edge_configs_are_accepted(student):
    """E = k = F = 1 with a tiny capacity factor and zero coefficients; k = E with expert choice: all valid."""
    got = student.run(edge_configs)
    assert got == [(1, 1, 1, "token_choice", "triton"), (3, 3, 128, "expert_choice", "torch")], (
        f"MoEConfig at the edges of the allowed values: {got}")


@pytest.mark.points(3)
@pytest.mark.parametrize("case,error,match", [
    ("top_k_too_large", ValueError, "top_k"), ("top_k_zero", ValueError, "top_k"),
    ("no_experts", ValueError, "ffn_width"), ("capacity_factor", ValueError, "capacity_factor"),
    ("capacity_factor_zero", ValueError, "capacity_factor"), ("mixtral_shapes", ValueError, "gate_up_proj"),
    ("routing", ValueError, "routing"), ("backend", ValueError, "backend"),
    ("negative_coef", ValueError, "aux_loss_coef"), ("negative_z_coef", ValueError, "z_loss_coef"),
    ("no_ffn", ValueError, "ffn_width"), ("dtype", TypeError, "float64"), ("width", ValueError, "width 6")])
def test_bad_input_is_refused(student, case, error, match):
    """MoEConfig refuses top_k outside [1, E], no experts, a capacity factor <= 0, unknown routing or backend,
    negative coefficients; the layer refuses an input of another dtype (TypeError) or width; load_mixtral_weights
    refuses a block of another shape."""
    with pytest.raises(error, match=match):
        student.run(raise_for, case)
