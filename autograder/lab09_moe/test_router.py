"""Lab 09, part 1: the router (router.py): top-k and Switch routing, the balancing losses, capacity, expert choice.

Producers (above the tests) call the student's functions in the worker; the tests compute what is expected here, from
the formulas, one token at a time in float64 (expected.py), and compare.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


def _logits(T: int, E: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return random_tensor(T, E, dtype=dtype, seed=seed, scale=2.0)


# -----------------------------------------------------------------------------
# Producers: run in the worker


def top_k_of(logits: torch.Tensor, top_k: int, renormalize: bool, seed: int) -> dict:
    from lab09_moe.router import top_k_routing

    logits = logits.clone().requires_grad_(True)
    weights, experts, probs = top_k_routing(logits, top_k=top_k, renormalize=renormalize)
    probe = random_tensor(*weights.shape, dtype=weights.dtype, seed=seed)
    (weights * probe).sum().backward()
    return {"weights": weights.detach(), "experts": experts, "probs": probs.detach(), "grad": logits.grad}


def switch_of(logits: torch.Tensor) -> dict:
    from lab09_moe.router import switch_routing

    logits = logits.clone().requires_grad_(True)
    weights, experts, probs = switch_routing(logits)
    weights.sum().backward()
    return {"weights": weights.detach(), "experts": experts, "probs": probs.detach(), "grad": logits.grad}


def losses_of(logits: torch.Tensor, top_k: int) -> dict:
    """The balancing loss on softmax(logits) and the student's top-k choice of the grader's kind; the z-loss."""
    from lab09_moe.router import load_balancing_loss, router_z_loss

    logits = logits.clone().requires_grad_(True)
    probs = torch.softmax(logits, dim=-1)
    experts = probs.detach().argsort(dim=-1, descending=True)[:, :top_k]
    aux = load_balancing_loss(probs, experts)
    aux_grad, = torch.autograd.grad(aux, logits) if aux.requires_grad else (torch.zeros_like(logits),)
    z = router_z_loss(logits)
    z_grad, = torch.autograd.grad(z, logits) if z.requires_grad else (torch.zeros_like(logits),)
    return {"aux": aux.detach(), "aux_grad": aux_grad, "z": z.detach(), "z_grad": z_grad}


def capacity_of(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    from lab09_moe.router import expert_capacity

    return expert_capacity(num_tokens, num_experts, top_k, capacity_factor)


def mask_of(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    from lab09_moe.router import capacity_mask

    return capacity_mask(experts, num_experts, capacity)


def route_of(logits: torch.Tensor, top_k: int, renormalize: bool, capacity_factor, seed: int) -> dict:
    from lab09_moe.router import route

    logits = logits.clone().requires_grad_(True)
    routing = route(logits, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor)
    probe = random_tensor(*routing.weights.shape, dtype=routing.weights.dtype, seed=seed)
    ((routing.weights * probe).sum() + 0.5 * routing.aux_loss + 0.25 * routing.z_loss).backward()
    return {"experts": routing.experts, "weights": routing.weights.detach(), "keep": routing.keep,
            "probs": routing.probs.detach(), "counts": routing.counts, "aux": routing.aux_loss.detach(),
            "z": routing.z_loss.detach(), "grad": logits.grad}


def expert_choice_of(logits: torch.Tensor, capacity: int) -> dict:
    from lab09_moe.router import expert_choice_routing

    logits = logits.clone().requires_grad_(True)
    gates, token_index, probs = expert_choice_routing(logits, capacity)
    gates.sum().backward()
    return {"gates": gates.detach(), "token_index": token_index, "probs": probs.detach(), "grad": logits.grad}


def raise_for(case: str) -> None:
    from lab09_moe import router

    logits = _logits(6, 4, seed=3)
    if case == "top_k_too_large":
        router.top_k_routing(logits, 5)
    elif case == "top_k_zero":
        router.route(logits, top_k=0)
    elif case == "route_top_k_too_large":
        router.route(logits, top_k=7)
    elif case == "capacity_factor":
        router.route(logits, top_k=2, capacity_factor=0.0)
    elif case == "not_2d":
        router.route(logits[None], top_k=2)
    elif case == "expert_choice_capacity":
        router.expert_choice_routing(logits, 7)
    elif case == "expert_choice_no_capacity":
        router.expert_choice_routing(logits, 0)
    elif case == "capacity_no_experts":
        router.expert_capacity(8, 0, 1, 1.0)
    elif case == "capacity_top_k_zero":
        router.expert_capacity(8, 4, 0, 1.0)
    elif case == "capacity_factor_zero":
        router.expert_capacity(8, 4, 2, 0.0)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _expected_top_k(logits, top_k, renormalize, probe_seed=None):
    """(weights, experts, probs, grad of sum(weights * probe)) from the formulas, float64."""
    from autograder.lab09_moe.expected import probabilities, ranked_experts

    leaf = logits.double().clone().requires_grad_(True)
    probs = probabilities(leaf)
    choices = ranked_experts(probs, top_k)
    picked = torch.stack([probs[t, row] for t, row in enumerate(choices)])  # (T, k)
    weights = picked / picked.sum(dim=-1, keepdim=True) if renormalize else picked
    probe = random_tensor(*weights.shape, dtype=torch.float64, seed=probe_seed) if probe_seed is not None else 1.0
    (weights * probe).sum().backward()
    return weights.detach(), torch.tensor(choices, dtype=torch.int64), probs.detach(), leaf.grad


@pytest.mark.points(4)
@pytest.mark.parametrize("T,E,k,renormalize", [(9, 4, 2, True), (7, 8, 3, True), (5, 6, 2, False), (6, 5, 5, True)])
def test_top_k_routing_matches_the_formula(student, T, E, k, renormalize):
    """softmax over E, the k largest probabilities (best first), renormalised to sum to 1 (Mixtral) or raw; the
    gradient of the weights reaches the logits. k = E routes every token everywhere."""
    logits = _logits(T, E, seed=T * E + k)
    got = student.run(top_k_of, logits, k, renormalize, 5)
    weights, experts, probs, grad = _expected_top_k(logits, k, renormalize, probe_seed=5)
    inputs = describe(logits=logits, top_k=k, renormalize=renormalize)
    assert torch.equal(got["experts"], experts), (
        f"top_k_routing on {inputs}: experts {got['experts'].tolist()}, expected {experts.tolist()} (the k most "
        "probable, best first)")
    check_close(got["probs"], probs, name="top_k_routing (probs)", inputs=inputs)
    check_close(got["weights"], weights, name="top_k_routing (weights)", inputs=inputs)
    check_close(got["grad"], grad, name="top_k_routing (gradient of the weights w.r.t. the logits)", inputs=inputs)


@pytest.mark.points(1)
def test_top_k_routing_upcasts_low_precision_logits(student):
    """bf16 logits: the softmax runs in fp32, so probabilities and weights come back fp32 (as Mixtral's router)."""
    logits = _logits(8, 4, seed=12).to(torch.bfloat16)
    got = student.run(top_k_of, logits, 2, True, 1)
    assert got["weights"].dtype == torch.float32 and got["probs"].dtype == torch.float32, (
        f"top_k_routing on bf16 logits returned weights {got['weights'].dtype} and probs {got['probs'].dtype}; "
        "the softmax must run in (at least) float32")
    weights, experts, probs, _ = _expected_top_k(logits.double(), 2, True)
    check_close(got["probs"], probs, name="top_k_routing (probs from bf16 logits)", inputs=describe(logits=logits))


@pytest.mark.points(2)
def test_switch_routing_keeps_the_raw_probability(student):
    """Top-1 with w = p_e(x), not renormalised, so the router gets a gradient through the weight."""
    logits = _logits(10, 4, seed=21)
    got = student.run(switch_of, logits)
    weights, experts, probs, grad = _expected_top_k(logits, 1, False)
    inputs = describe(logits=logits)
    assert torch.equal(got["experts"], experts), f"switch_routing: experts {got['experts'].tolist()}"
    check_close(got["weights"], weights, name="switch_routing (weights = p of the chosen expert)", inputs=inputs)
    check_close(got["grad"], grad, name="switch_routing (gradient w.r.t. the logits)", inputs=inputs)


@pytest.mark.points(4)
@pytest.mark.parametrize("T,E,k", [(12, 4, 1), (9, 6, 2), (7, 3, 3)])
def test_balancing_and_z_losses_match_the_formulas(student, T, E, k):
    """L_aux = E sum_i f_i P_i with f_i = share of the k T assignments, P_i = mean probability (gradient through P
    only); L_z = mean logsumexp(logits)^2, and its gradient."""
    from autograder.lab09_moe.expected import balance_loss, z_loss

    logits = _logits(T, E, seed=40 + T)
    got = student.run(losses_of, logits, k)
    leaf = logits.clone().requires_grad_(True)
    aux = balance_loss(leaf, k)
    aux_grad, = torch.autograd.grad(aux, leaf)
    leaf = logits.clone().requires_grad_(True)
    z = z_loss(leaf)
    z_grad, = torch.autograd.grad(z, leaf)
    inputs = describe(logits=logits, top_k=k)
    check_close(got["aux"], aux.detach(), name="load_balancing_loss", inputs=inputs)
    check_close(got["aux_grad"], aux_grad, name="load_balancing_loss (gradient, through P only)", inputs=inputs)
    check_close(got["z"], z.detach(), name="router_z_loss", inputs=inputs)
    check_close(got["z_grad"], z_grad, name="router_z_loss (gradient)", inputs=inputs)


@pytest.mark.points(2)
def test_balancing_loss_at_the_extremes(student):
    """Uniform routing gives exactly 1; every token on one expert with all the probability gives E. No token gives 0."""
    uniform = torch.zeros(8, 4, dtype=torch.float64)  # every probability 1/4; top-1 ties broken any way
    got = student.run(losses_of, uniform, 1)
    check_close(got["aux"], torch.tensor(1.0, dtype=torch.float64), name="load_balancing_loss (uniform router)",
                inputs="logits all zero, E=4, k=1")
    collapsed = torch.full((6, 4), -40.0, dtype=torch.float64)
    collapsed[:, 2] = 40.0
    got = student.run(losses_of, collapsed, 1)
    check_close(got["aux"], torch.tensor(4.0, dtype=torch.float64), name="load_balancing_loss (collapsed router)",
                inputs="every token certain of expert 2, E=4, k=1")
    got = student.run(losses_of, torch.zeros(0, 4, dtype=torch.float64), 2)
    for key in ("aux", "z"):
        assert float(got[key]) == 0.0, f"with no tokens, {key} should be 0, got {float(got[key])}"


@pytest.mark.points(2)
@pytest.mark.parametrize("T,E,k,cf", [(16, 4, 1, 1.0), (10, 4, 2, 1.25), (7, 3, 2, 0.5), (9, 8, 2, 1.5),
                                      (1, 16, 1, 1.0), (5, 1, 1, 1.0)])
def test_expert_capacity(student, T, E, k, cf):
    """capacity = ceil(cf * k * T / E)."""
    from autograder.lab09_moe.expected import capacity_of as expected_capacity

    got = student.run(capacity_of, T, E, k, cf)
    want = expected_capacity(T, E, k, cf)
    assert got == want, f"expert_capacity(T={T}, E={E}, k={k}, capacity_factor={cf}) = {got}, expected {want}"


@pytest.mark.points(3)
@pytest.mark.parametrize("T,E,k,capacity", [(11, 3, 2, 4), (8, 4, 1, 1), (6, 2, 2, 0), (9, 5, 3, 100)])
def test_capacity_mask_serves_first_choices_first(student, T, E, k, capacity):
    """Each expert keeps its first `capacity` assignments: all first choices in token order, then second choices."""
    from autograder.lab09_moe.expected import kept_by_capacity

    generator = torch.Generator().manual_seed(T + E)
    experts = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)])  # (T, k), distinct per row
    got = student.run(mask_of, experts, E, capacity)
    want = torch.tensor(kept_by_capacity(experts.tolist(), E, capacity))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool and torch.equal(got, want), (
        f"capacity_mask(experts={experts.tolist()}, E={E}, capacity={capacity}) returned "
        f"{got.tolist() if isinstance(got, torch.Tensor) else got}, expected {want.tolist()}")


@pytest.mark.points(4)
@pytest.mark.parametrize("k,renormalize,cf", [(2, True, None), (2, True, 0.75), (1, False, 1.0)])
def test_route_puts_it_together(student, k, renormalize, cf):
    """route: experts, weights (zero where dropped), keep, counts before dropping, both losses, and one backward
    through weights + 0.5 aux + 0.25 z."""
    from autograder.lab09_moe.expected import balance_loss, capacity_of, kept_by_capacity, ranked_experts, z_loss

    T, E = 13, 4
    logits = _logits(T, E, seed=60 + k)
    got = student.run(route_of, logits, k, renormalize, cf, 8)
    weights, experts, probs, _ = _expected_top_k(logits, k, renormalize)
    capacity = None if cf is None else capacity_of(T, E, k, cf)
    keep = torch.tensor(kept_by_capacity(experts.tolist(), E, capacity))
    leaf = logits.clone().requires_grad_(True)
    from autograder.lab09_moe.expected import probabilities

    p = probabilities(leaf)
    picked = torch.stack([p[t, row] for t, row in enumerate(ranked_experts(p, k))])
    w = (picked / picked.sum(dim=-1, keepdim=True) if renormalize else picked) * keep
    probe = random_tensor(T, k, dtype=torch.float64, seed=8)
    ((w * probe).sum() + 0.5 * balance_loss(leaf, k) + 0.25 * z_loss(leaf)).backward()
    inputs = describe(logits=logits, top_k=k, renormalize=renormalize, capacity_factor=cf)
    assert torch.equal(got["experts"], experts), f"route on {inputs}: experts {got['experts'].tolist()}"
    assert torch.equal(got["keep"], keep), (
        f"route on {inputs}: keep {got['keep'].tolist()}, expected {keep.tolist()} (capacity {capacity})")
    counts = torch.bincount(experts.flatten(), minlength=E)
    assert torch.equal(got["counts"], counts), (
        f"route on {inputs}: counts {got['counts'].tolist()}, expected {counts.tolist()} (every routed assignment, "
        "before dropping)")
    check_close(got["weights"], w.detach(), name="route (weights, zero where dropped)", inputs=inputs)
    check_close(got["aux"], balance_loss(logits, k), name="route (aux_loss)", inputs=inputs)
    check_close(got["z"], z_loss(logits), name="route (z_loss)", inputs=inputs)
    check_close(got["grad"], leaf.grad, name="route (gradient w.r.t. the logits)", inputs=inputs)


@pytest.mark.points(3)
@pytest.mark.parametrize("T,E,capacity", [(10, 4, 3), (5, 3, 5), (7, 6, 1)])
def test_expert_choice_routing(student, T, E, capacity):
    """Each expert picks the `capacity` tokens with the highest softmax score in its column, best first."""
    from autograder.lab09_moe.expected import probabilities

    logits = _logits(T, E, seed=80 + T)
    got = student.run(expert_choice_of, logits, capacity)
    leaf = logits.clone().requires_grad_(True)
    probs = probabilities(leaf)
    picks = [sorted(range(T), key=lambda t: -probs[t, e].item())[:capacity] for e in range(E)]
    gates = torch.stack([probs[picks[e], e] for e in range(E)])
    gates.sum().backward()
    inputs = describe(logits=logits, capacity=capacity)
    assert torch.equal(got["token_index"], torch.tensor(picks)), (
        f"expert_choice_routing on {inputs}: token_index {got['token_index'].tolist()}, expected {picks}")
    check_close(got["gates"], gates.detach(), name="expert_choice_routing (gates)", inputs=inputs)
    check_close(got["probs"], probs.detach(), name="expert_choice_routing (probs)", inputs=inputs)
    check_close(got["grad"], leaf.grad, name="expert_choice_routing (gradient of the gates)", inputs=inputs)


@pytest.mark.points(3)
@pytest.mark.parametrize("case,match", [("top_k_too_large", "top_k"), ("top_k_zero", "top_k"),
                                        ("route_top_k_too_large", "top_k"), ("capacity_factor", "capacity"),
                                        ("not_2d", "T, E"), ("expert_choice_capacity", "capacity"),
                                        ("expert_choice_no_capacity", "capacity"),
                                        ("capacity_no_experts", "num_experts"), ("capacity_top_k_zero", "top_k"),
                                        ("capacity_factor_zero", "capacity_factor")])
def test_bad_input_is_refused(student, case, match):
    """top_k outside [1, E], a capacity factor <= 0, logits that are not (T, E), an expert-choice capacity outside
    [1, T], expert_capacity with no experts or k = 0."""
    with pytest.raises(ValueError, match=match):
        student.run(raise_for, case)
