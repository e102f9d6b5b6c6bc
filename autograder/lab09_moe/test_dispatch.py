"""Lab 09, part 2: dispatch (dispatch.py): sorting assignments by expert, gathering and scattering rows."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


def _assignments(T: int, E: int, k: int, seed: int, *, unused: tuple[int, ...] = ()) -> torch.Tensor:
    """(T, k) distinct experts per token, never any expert in `unused`."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in unused])
    return torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:k]] for _ in range(T)])


# -----------------------------------------------------------------------------
# Producers: run in the worker


def plan_of(experts: torch.Tensor, num_experts: int, keep) -> dict:
    from lab09_moe.dispatch import make_dispatch

    plan = make_dispatch(experts, num_experts, keep=keep)
    return {"token_index": plan.token_index, "assignment": plan.assignment, "counts": plan.counts,
            "offsets": plan.offsets}


def round_trip(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, num_experts: int, keep,
               seed: int) -> dict:
    """permute, a per-row scale standing in for the experts, unpermute; gradients of a probe w.r.t. x and the
    weights."""
    from lab09_moe.dispatch import make_dispatch, permute, unpermute

    x = x.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    plan = make_dispatch(experts, num_experts, keep=keep)
    rows = permute(x, plan)  # (A, C)
    scale = 1.0 + plan.assignment.to(rows.dtype)[:, None] / 10  # a different factor per assignment
    out = unpermute(rows * scale, plan, weights, x.shape[0])
    probe = random_tensor(*out.shape, dtype=out.dtype, seed=seed)
    (out * probe).sum().backward()
    return {"rows": rows.detach(), "out": out.detach(), "dx": x.grad, "dweights": weights.grad}


def unpermute_dtype(seed: int) -> dict:
    """bf16 expert outputs combined with fp32 router weights."""
    from lab09_moe.dispatch import make_dispatch, unpermute

    experts = _assignments(6, 3, 2, seed)
    plan = make_dispatch(experts, 3)
    y = random_tensor(12, 8, seed=seed).to(torch.bfloat16)
    weights = torch.rand(6, 2, generator=torch.Generator().manual_seed(seed))
    return {"out": unpermute(y, plan, weights, 6), "y": y, "assignment": plan.assignment,
            "token_index": plan.token_index}


def raise_for(case: str) -> None:
    from lab09_moe.dispatch import make_dispatch

    experts = _assignments(5, 4, 2, seed=1)
    if case == "expert_out_of_range":
        make_dispatch(experts, 3 if int(experts.max()) == 3 else 2)
    elif case == "negative_expert":
        make_dispatch(experts - 1 - int(experts.min()), 4)  # the smallest index is -1
    elif case == "keep_shape":
        make_dispatch(experts, 4, keep=torch.ones(5, 1, dtype=torch.bool))


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _expected_plan(experts: torch.Tensor, E: int, keep) -> dict:
    """Walk the experts in order; within each, the kept assignments in token order (slot order within a token)."""
    T, k = experts.shape
    table = experts.tolist()
    kept = keep.tolist() if keep is not None else [[True] * k for _ in range(T)]
    assignment, counts = [], []
    for e in range(E):
        mine = [t * k + j for t in range(T) for j in range(k) if table[t][j] == e and kept[t][j]]
        assignment += mine
        counts.append(len(mine))
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return {"assignment": torch.tensor(assignment, dtype=torch.int64),
            "token_index": torch.tensor([a // k for a in assignment], dtype=torch.int64),
            "counts": torch.tensor(counts, dtype=torch.int64), "offsets": torch.tensor(offsets, dtype=torch.int64)}


@pytest.mark.points(4)
@pytest.mark.parametrize("T,E,k,unused,dropped", [(9, 4, 2, (), False), (7, 6, 3, (0, 5), False),
                                                  (10, 5, 2, (2,), True), (1, 3, 1, (), False)])
def test_make_dispatch_sorts_by_expert(student, T, E, k, unused, dropped):
    """Rows grouped by expert (token order within an expert), counts, offsets (E + 1, from 0), the assignment index
    t * k + j of each row; experts with no tokens (first, middle or last) and dropped assignments."""
    experts = _assignments(T, E, k, seed=T * 10 + E, unused=unused)
    keep = None
    if dropped:
        keep = torch.rand(T, k, generator=torch.Generator().manual_seed(T)) > 0.4
    got = student.run(plan_of, experts, E, keep)
    want = _expected_plan(experts, E, keep)
    inputs = describe(experts=experts, num_experts=E, keep=keep)
    for key in ("counts", "offsets", "assignment", "token_index"):
        have = got[key]
        assert isinstance(have, torch.Tensor) and have.dtype == torch.int64 and torch.equal(have, want[key]), (
            f"make_dispatch on {inputs}: {key} = {have.tolist() if isinstance(have, torch.Tensor) else have}, "
            f"expected {want[key].tolist()} (int64)" + (f"; experts {experts.tolist()}" if T < 12 else ""))


def _expected_round_trip(x, experts, weights, E, keep, seed):
    """Every kept assignment (t, j) adds w[t, j] * (1 + index/10) * x[t] to out[t]."""
    T, k = experts.shape
    leaf_x = x.clone().requires_grad_(True)
    leaf_w = weights.clone().requires_grad_(True)
    kept = keep.tolist() if keep is not None else [[True] * k for _ in range(T)]
    out = []
    for t in range(T):
        row = torch.zeros(x.shape[1], dtype=x.dtype)
        for j in range(k):
            if kept[t][j]:
                row = row + leaf_w[t, j] * (1.0 + (t * k + j) / 10) * leaf_x[t]
        out.append(row)
    out = torch.stack(out)
    (out * random_tensor(*out.shape, dtype=out.dtype, seed=seed)).sum().backward()
    return out.detach(), leaf_x.grad, leaf_w.grad


@pytest.mark.points(4)
@pytest.mark.parametrize("T,E,k,dropped", [(8, 4, 2, False), (6, 5, 3, True), (5, 2, 1, False)])
def test_permute_and_unpermute(student, T, E, k, dropped):
    """permute gathers x[token_index]; unpermute sums w * rows back into each token (zero rows for tokens with
    nothing kept); gradients reach x (summed over a token's copies) and the router weights."""
    experts = _assignments(T, E, k, seed=T + 100)
    keep = None
    if dropped:
        keep = torch.ones(T, k, dtype=torch.bool)
        keep[0] = False  # token 0 loses every assignment: its output row is zero
        keep[2, 1:] = False
    x = random_tensor(T, 6, dtype=torch.float64, seed=T)
    weights = torch.rand(T, k, generator=torch.Generator().manual_seed(T), dtype=torch.float64) + 0.1
    got = student.run(round_trip, x, experts, weights, E, keep, 3)
    plan = _expected_plan(experts, E, keep)
    out, dx, dw = _expected_round_trip(x, experts, weights, E, keep, 3)
    inputs = describe(x=x, experts=experts, keep=keep)
    check_close(got["rows"], x[plan["token_index"]], name="permute (rows in expert order)", inputs=inputs)
    check_close(got["out"], out, name="unpermute (weighted sum per token)", inputs=inputs)
    check_close(got["dx"], dx, name="permute/unpermute (gradient w.r.t. x)", inputs=inputs)
    check_close(got["dweights"], dw, name="unpermute (gradient w.r.t. the router weights)", inputs=inputs)


@pytest.mark.points(2)
def test_round_trip_with_normalised_weights_is_the_identity(student):
    """Weights that sum to 1 per token and identity experts give back x exactly (up to fp64 rounding)."""
    T, E, k = 7, 3, 3
    experts = _assignments(T, E, k, seed=4)
    x = random_tensor(T, 5, dtype=torch.float64, seed=4)
    weights = torch.rand(T, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights /= weights.sum(dim=1, keepdim=True)  # each token's weights sum to 1
    got = student.run(round_trip, x, experts, weights / torch.tensor([[1.0 + (t * k + j) / 10 for j in range(k)]
                                                                       for t in range(T)], dtype=torch.float64),
                      E, None, 1)
    check_close(got["out"], x, name="unpermute(permute(x)) with weights summing to 1", inputs=describe(x=x, k=k))


@pytest.mark.points(1)
def test_unpermute_accumulates_in_fp32_and_returns_the_rows_dtype(student):
    """bf16 rows with fp32 weights: the sum is formed in fp32, then rounded once to bf16 (within one bf16 ulp of the
    float64 sum)."""
    got = student.run(unpermute_dtype, 9)
    assert got["out"].dtype == torch.bfloat16, f"unpermute of bf16 rows returned {got['out'].dtype}"
    weights = torch.rand(6, 2, generator=torch.Generator().manual_seed(9))
    want = torch.zeros(6, 8, dtype=torch.float64)
    for row, (a, t) in enumerate(zip(got["assignment"].tolist(), got["token_index"].tolist())):
        want[t] += weights.flatten()[a].double() * got["y"][row].double()
    check_close(got["out"], want.to(torch.bfloat16), name="unpermute (bf16 rows, fp32 weights)",
                inputs="y (12, 8) bf16, weights (6, 2) fp32", rtol=2**-8, atol=1e-6)


@pytest.mark.points(2)
@pytest.mark.parametrize("case,match", [("expert_out_of_range", r"\[0, "), ("negative_expert", r"\[0, "),
                                        ("keep_shape", "shape")])
def test_bad_input_is_refused(student, case, match):
    """An expert index outside [0, E), or a keep mask of another shape: ValueError."""
    with pytest.raises(ValueError, match=match):
        student.run(raise_for, case)
