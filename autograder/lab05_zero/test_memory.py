"""Lab 05, part 7: bytes per rank, counted, against the ZeRO paper's formulas (memory.py)."""

import math

import pytest
import torch

from common.testing import describe

STAGES = [[1, False], [2, False], [3, False], [1, True], [2, True], [3, True]]

# -----------------------------------------------------------------------------
# Producers: run in the worker


def formula(stage: int, num_params: int, world_size: int, options: dict) -> list:
    from lab05_zero.memory import zero_formula

    got = zero_formula(stage, num_params, world_size, **options)
    return [float(got.params), float(got.grads), float(got.optimizer), float(got.host), float(got.device)]


def formula_error(stage: int, num_params: int, world_size: int, offload: bool) -> None:
    from lab05_zero.memory import zero_formula

    zero_formula(stage, num_params, world_size, offload=offload)


def counted_bytes() -> list:
    """storage_bytes on: views of one base; two tensors; a view and its base; a freed storage and a None."""
    from lab05_zero.memory import storage_bytes

    base = torch.zeros(10, dtype=torch.float64)
    other = torch.zeros(3, 4, dtype=torch.bfloat16)
    freed = torch.zeros(100)
    freed.untyped_storage().resize_(0)
    return [storage_bytes([base[2:5], base[:1], base.view(2, 5)]), storage_bytes([base, other, other.t()]),
            storage_bytes([base[3:], None, freed]), storage_bytes([])]


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _paper(stage: int, psi: float, n: int, p: int = 2, g: int = 2, k: int = 12, offload: bool = False) -> list:
    """Figure 1 of the paper, written out per stage."""
    table = {0: (p * psi, g * psi, k * psi), 1: (p * psi, g * psi, k * psi / n), 2: (p * psi, g * psi / n, k * psi / n),
             3: (p * psi / n, g * psi / n, k * psi / n)}
    params, grads, optimizer = table[stage]
    host = 0.0
    if offload:
        host, optimizer = optimizer + g * psi / n, 0.0
    return [params, grads, optimizer, host, params + grads + optimizer]


@pytest.mark.points(2)
@pytest.mark.parametrize("stage, num_params, world_size, options", [
    (0, 1000, 8, {}), (1, 1000, 8, {}), (2, 1000, 8, {}), (3, 1000, 8, {}), (3, 7_500_000_000, 64, {}),
    (1, 12, 3, {"param_bytes": 4, "grad_bytes": 4, "optimizer_bytes": 8}), (2, 6, 4, {"offload": True}),
    (3, 100, 1, {"offload": True, "grad_bytes": 4}), (1, 40, 5, {"offload": True, "optimizer_bytes": 16}),
    (2, 0, 2, {}),
])
def test_formulas(student, stage, num_params, world_size, options):
    """zero_formula gives the paper's bytes per rank (parameters, gradients, optimizer state, host) for every stage,
    the paper's 7.5B-parameter example on 64 ranks, other byte counts, offload and Ψ=0."""
    got = student.run(formula, stage, num_params, world_size, options)
    p, g, k = options.get("param_bytes", 2), options.get("grad_bytes", 2), options.get("optimizer_bytes", 12)
    want = _paper(stage, num_params, world_size, p, g, k, options.get("offload", False))
    names = ["params", "grads", "optimizer", "host", "device"]
    for name, have, expected in zip(names, got, want):
        assert math.isclose(have, expected, rel_tol=1e-12), (
            f"zero_formula({describe(stage=stage, num_params=num_params, world_size=world_size, **options)}).{name} "
            f"= {have}, expected {expected}")


@pytest.mark.points(1)
def test_formula_errors(student):
    """A stage outside 0-3, a negative Ψ, N < 1 and offload at stage 0 raise ValueError."""
    for args, match in (((4, 10, 2, False), "stage"), ((1, -1, 2, False), "num_params"), ((1, 10, 0, False),
                                                                                         "world_size"),
                        ((0, 10, 2, True), "offload")):
        with pytest.raises(ValueError, match=match):
            student.run(formula_error, *args)


@pytest.mark.points(1)
def test_storage_bytes_counts_distinct_storages(student):
    """Views count their base once, distinct tensors add up, a freed storage counts 0 and None is skipped."""
    got = student.run(counted_bytes)
    assert got == [80, 80 + 24, 80, 0], f"storage_bytes gave {got}, expected [80, 104, 80, 0]"


@pytest.mark.points(4)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_measured_bytes_equal_the_formula(student, world_size):
    """After one bf16 step of each stage, with and without offload (as rank 0 of N; N > 1 on torch's fake process
    group): measure_memory equals the formula at the padded Ψ exactly; the test's own count of every live tensor
    byte grew by the formula's total within 10%; ZeRO-3's peak of gathered parameters is root + two blocks."""
    from autograder.lab05_zero.workers import make_model, measure, unit_numels

    got = student.run(measure, STAGES, world_size)
    model = make_model(seed=0)
    numels = unit_numels(model)
    psi_padded = sum(math.ceil(n / world_size) * world_size for n in numels.values())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    raw = sum(numels.values())
    for stage, offload in STAGES:
        key = f"{stage}{'+offload' if offload else ''}"
        inputs = describe(stage=stage, offload=offload, world_size=world_size, param_dtype="bfloat16",
                          padded_params=psi_padded)
        want = _paper(stage, psi_padded, world_size, offload=offload)
        measured = got[key]["measured"]
        for name, have, expected in zip(["params", "grads", "optimizer", "host"], measured, want):
            assert have == expected, (f"measure_memory: {name} = {have:.0f} bytes, the formula says {expected:.0f} "
                                      f"(off by {have - expected:+.0f}) ({inputs})")
        total = want[4] + want[3]
        # fp32 trainable and frozen weights were replaced by the engine's state and a bf16 frozen copy
        expected_delta = total + 2 * frozen - 4 * (raw + frozen)
        delta = got[key]["live_delta"]
        assert abs(delta - expected_delta) <= 0.1 * total, (
            f"the rank's live tensors grew by {delta} bytes; the formula predicts {expected_delta:.0f} "
            f"({total:.0f} of model states, less the fp32 weights they replace): more than 10% apart ({inputs})")
        if stage == 3:
            blocks = sorted((2 * math.ceil(n / world_size) * world_size for u, n in numels.items() if u != "root"),
                            reverse=True)
            root = 2 * math.ceil(numels["root"] / world_size) * world_size
            assert got[key]["gathered"] <= root + blocks[0] + blocks[1], (
                f"ZeRO-3 had {got[key]['gathered']} bytes of parameters gathered at once; root and the two "
                f"largest blocks are {root + blocks[0] + blocks[1]} ({inputs})")
            assert got[key]["peak"] == got[key]["gathered"], (
                f"ZeRO3.peak_gathered_bytes = {got[key]['peak']}, the test counted {got[key]['gathered']} ({inputs})")
