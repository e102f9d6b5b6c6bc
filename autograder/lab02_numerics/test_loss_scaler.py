"""Lab 02, part 1a: the dynamic loss scaler (loss_scaler.py): skip, back off, grow, and follow GradScaler exactly.

Producers (above the tests) run the student's scaler in the grading worker and return what it did; the tests run
torch.amp.GradScaler, or the state machine of the docstring, here in the grader and compare.
"""

import math

import pytest
import torch

from common.testing import check_close, describe, random_tensor

POISONS = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _problem(seed: int, sizes: tuple[int, ...], optimizer: str, lr: float, spread: float):
    """Parameters, their targets and an optimizer: the loss is sum_i ||p_i - t_i||^2."""
    params = [torch.nn.Parameter(random_tensor(n, seed=seed + 2 * i)) for i, n in enumerate(sizes)]
    targets = [p.detach() + spread * random_tensor(n, seed=seed + 2 * i + 1) for i, (p, n) in
               enumerate(zip(params, sizes))]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif optimizer == "momentum":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.SGD(params, lr=lr)
    return params, targets, opt


def _scaled_backward(scaler, params, targets, poison) -> torch.Tensor:
    """backward of scaler.scale(loss); then an overflow written into a gradient when asked: (kind, param index)."""
    loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets))
    scaled = scaler.scale(loss)
    scaled.backward()
    if poison is not None:
        kind, which = poison
        params[which].grad[-1 if which else 0] = POISONS[kind]
    return scaled.detach()


def _run(scaler, pattern, *, seed, sizes, optimizer, lr, spread, unscale_first, clip, record) -> dict:
    """The training loop both the student's scaler and GradScaler go through; `record(scaler)` reads the state."""
    params, targets, opt = _problem(seed, sizes, optimizer, lr, spread)
    out = {"scaled_loss": [], "unscaled_grads": [], "found": [], "stepped": [], "weights": [], "state": []}
    for poison in pattern:
        opt.zero_grad()
        out["scaled_loss"].append(_scaled_backward(scaler, params, targets, poison))
        if unscale_first:
            out["found"].append(scaler.unscale_(opt))
            out["unscaled_grads"].append([p.grad.detach().clone() for p in params])
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
        out["stepped"].append(scaler.step(opt))
        scaler.update()
        out["weights"].append([p.detach().clone() for p in params])
        out["state"].append(record(scaler))
    return out


# -----------------------------------------------------------------------------
# Producers: run in the worker


def scaler_run(config: dict | None, pattern: list, *, seed: int = 1, sizes: tuple = (7,), optimizer: str = "sgd",
               lr: float = 0.1, spread: float = 1.0, unscale_first: bool = False, clip: float | None = None) -> dict:
    """The student's DynamicLossScaler through `pattern` (None: a clean step; (kind, index): an overflow)."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    scaler = DynamicLossScaler(LossScalerConfig(**config)) if config is not None else DynamicLossScaler()
    initial = (float(scaler.get_scale()), int(scaler.growth_tracker))
    out = _run(scaler, pattern, seed=seed, sizes=sizes, optimizer=optimizer, lr=lr, spread=spread,
               unscale_first=unscale_first, clip=clip,
               record=lambda s: (float(s.get_scale()), int(s.growth_tracker), int(s.num_skipped)))
    out["initial"] = initial
    return out


def scale_of(loss: torch.Tensor, config: dict | None) -> dict:
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    scaler = DynamicLossScaler(LossScalerConfig(**config)) if config is not None else DynamicLossScaler()
    return {"scaled": scaler.scale(loss), "scale": float(scaler.get_scale())}


def non_finite_of(grads: list) -> dict:
    from lab02_numerics.loss_scaler import found_non_finite

    found = found_non_finite(grads)
    return {"value": bool(found) if isinstance(found, bool) else None, "type": type(found).__name__}


def config_error(config: dict) -> None:
    from lab02_numerics.loss_scaler import LossScalerConfig

    LossScalerConfig(**config)


def unscale_twice() -> None:
    """unscale_ twice in one iteration: the second call must raise."""
    from lab02_numerics.loss_scaler import DynamicLossScaler

    params, targets, opt = _problem(3, (4,), "sgd", 0.1, 1.0)
    scaler = DynamicLossScaler()
    _scaled_backward(scaler, params, targets, None)
    scaler.unscale_(opt)
    scaler.unscale_(opt)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _gradscaler(config: dict | None):
    return torch.amp.GradScaler("cpu", **(config or {}))


def _expected(config: dict | None, pattern: list, **kwargs) -> dict:
    """GradScaler through the same loop, and the docstring's state machine for the growth counter and skips."""
    want = _run(_gradscaler(config), pattern, record=lambda s: float(s.get_scale()), **kwargs)
    interval = (config or {}).get("growth_interval", 2000)
    tracker, skipped, states = 0, 0, []
    for poison in pattern:
        if poison is not None:
            tracker, skipped = 0, skipped + 1
        else:
            tracker = 0 if tracker + 1 == interval else tracker + 1
        states.append((tracker, skipped))
    want["state"] = [(scale, *state) for scale, state in zip(want["state"], states)]
    want["stepped"] = [poison is None for poison in pattern]
    return want


def _compare(got: dict, want: dict, pattern: list, *, what: str) -> None:
    shown = [p[0] if p else "-" for p in pattern]
    for step in range(len(pattern)):
        inputs = describe(overflow_pattern=shown[:step + 1])
        assert got["state"][step][0] == want["state"][step][0], (
            f"{what}: the scale after step {step} is {got['state'][step][0]}, GradScaler's is {want['state'][step][0]} "
            f"(scales so far: yours {[s[0] for s in got['state'][:step + 1]]}, GradScaler "
            f"{[s[0] for s in want['state'][:step + 1]]}; pattern {shown[:step + 1]})")
        assert got["state"][step][1:] == want["state"][step][1:], (
            f"{what}: after step {step} (growth_tracker, num_skipped) = {got['state'][step][1:]}, expected "
            f"{want['state'][step][1:]} (pattern {shown[:step + 1]})")
        assert got["stepped"][step] is want["stepped"][step], (
            f"{what}: step() returned {got['stepped'][step]!r} at step {step}, expected {want['stepped'][step]!r} "
            "(True when the optimizer stepped, False when an overflow skipped it)")
        check_close(got["scaled_loss"][step], want["scaled_loss"][step], name=f"{what}: scale(loss) at step {step}",
                    inputs=inputs)
        for index, (have, expect) in enumerate(zip(got["weights"][step], want["weights"][step])):
            check_close(have, expect, name=f"{what}: parameter {index} after step {step} (vs GradScaler)",
                        inputs=inputs)
        if want["unscaled_grads"]:
            assert got["found"][step] is (pattern[step] is not None), (
                f"{what}: unscale_ returned {got['found'][step]!r} at step {step}; it must return whether a gradient "
                "is inf/NaN")
            if pattern[step] is None:
                for index, (have, expect) in enumerate(zip(got["unscaled_grads"][step],
                                                           want["unscaled_grads"][step])):
                    check_close(have, expect, name=f"{what}: gradient {index} after unscale_ at step {step}",
                                inputs=inputs)


@pytest.mark.points(1)
def test_scale_multiplies_loss(student):
    """scale(loss) is S * loss with S = init_scale (2^16 by default); nonsense configs are refused."""
    loss = random_tensor(1, seed=0).squeeze()
    for config, scale in ((None, 2.0**16), ({"init_scale": 3.0}, 3.0)):
        got = student.run(scale_of, loss, config)
        assert got["scale"] == scale, f"get_scale() with config {config} is {got['scale']}, expected {scale}"
        check_close(got["scaled"], loss * scale, name="DynamicLossScaler.scale", inputs=describe(loss=loss, S=scale))
    with pytest.raises(ValueError, match="backoff_factor"):
        student.run(config_error, {"backoff_factor": 1.5})
    with pytest.raises(ValueError, match="growth_interval"):
        student.run(config_error, {"growth_interval": 0})


@pytest.mark.points(1)
def test_found_non_finite(student):
    """found_non_finite: any inf, -inf or NaN in any tensor of the list; an empty list (or empty tensors) has none."""
    finite = [random_tensor(5, seed=1), random_tensor(2, 3, seed=2).to(torch.bfloat16)]
    cases = [([], False), (finite, False), ([torch.empty(0)], False)]
    for kind, value in POISONS.items():
        poisoned = random_tensor(2, 3, seed=3)
        poisoned[1, 2] = value
        cases += [(finite + [poisoned], True), ([poisoned.to(torch.float16)], True)]
    for grads, expected in cases:
        got = student.run(non_finite_of, grads)
        shown = [tuple(g.shape) for g in grads]
        assert got["type"] == "bool", f"found_non_finite({shown}) must return a bool, got a {got['type']}"
        assert got["value"] is expected, f"found_non_finite({shown}, with {'an overflow' if expected else 'none'}) " \
                                         f"returned {got['value']}, expected {expected}"


@pytest.mark.points(3)
@pytest.mark.parametrize("poison", ["inf", "nan"])
def test_overflow_skips_step_and_halves_scale(student, poison):
    """An inf/NaN gradient: optimizer.step is skipped (weights unchanged), S halves, the growth counter resets."""
    config = {"init_scale": 1024.0, "growth_interval": 5}
    pattern = [None, None, (poison, 0), None]
    got = student.run(scaler_run, config, pattern)
    assert got["initial"] == (1024.0, 0), f"a new scaler must start at (init_scale, growth_tracker 0), got " \
                                          f"{got['initial']}"
    assert got["state"][1][1] == 2, f"after 2 clean steps growth_tracker should be 2, got {got['state'][1][1]}"
    assert torch.equal(got["weights"][2][0], got["weights"][1][0]), \
        f"a {poison} gradient must not change the weights (the step is skipped)"
    assert got["state"][2] == (512.0, 0, 1), (
        f"after one overflow from 1024: (scale, growth_tracker, num_skipped) should be (512.0, 0, 1), got "
        f"{got['state'][2]}")
    _compare(got, _expected(config, pattern, seed=1, sizes=(7,), optimizer="sgd", lr=0.1, spread=1.0,
                            unscale_first=False, clip=None), pattern, what=f"DynamicLossScaler ({poison})")


@pytest.mark.points(2)
def test_scale_grows_after_interval(student):
    """After growth_interval clean steps in a row S doubles (and not before); gradients reach the optimizer unscaled."""
    config = {"init_scale": 8.0, "growth_interval": 3}
    pattern = [None] * 7
    got = student.run(scaler_run, config, pattern, seed=3, sizes=(5,), lr=0.05)
    scales = [state[0] for state in got["state"]]
    assert scales == [8, 8, 16, 16, 16, 32, 32], f"scale after each of 7 clean steps (interval 3): {scales}"
    _compare(got, _expected(config, pattern, seed=3, sizes=(5,), optimizer="sgd", lr=0.05, spread=1.0,
                            unscale_first=False, clip=None), pattern, what="DynamicLossScaler (growth)")


@pytest.mark.points(4)
def test_matches_gradscaler_trajectory(student):
    """Same overflow pattern (inf, -inf and NaN in either of two tensors), same Adam: scale, weights, skips and the
    growth counter follow torch.amp.GradScaler step for step."""
    draws = torch.rand(40, generator=torch.Generator().manual_seed(5))
    kinds = list(POISONS)
    pattern = [(kinds[i % 3], i % 2) if d < 0.3 else None for i, d in enumerate(draws.tolist())]
    config = {"init_scale": 2.0**10, "growth_interval": 3}
    options = dict(seed=6, sizes=(6, 3), optimizer="adam", lr=0.01, spread=1.0)
    got = student.run(scaler_run, config, pattern, **options)
    _compare(got, _expected(config, pattern, unscale_first=False, clip=None, **options), pattern,
             what="DynamicLossScaler vs GradScaler (Adam)")


@pytest.mark.points(2)
def test_unscale_before_clipping(student):
    """unscale_ divides the gradients by S in place and reports overflow, so clipping sees the true norm; step()
    then does not unscale again. Twice in one iteration is an error."""
    pattern = [None, ("inf", 1), None, None, ("-inf", 0), None]
    config = {"init_scale": 2.0**12, "growth_interval": 2}
    options = dict(seed=8, sizes=(9, 4), optimizer="momentum", lr=0.05, spread=1.0, unscale_first=True, clip=0.5)
    got = student.run(scaler_run, config, pattern, **options)
    _compare(got, _expected(config, pattern, **options), pattern, what="unscale_, clip, step (vs GradScaler)")
    with pytest.raises(RuntimeError, match="already"):
        student.run(unscale_twice)


@pytest.mark.points(1)
def test_growth_stops_at_the_largest_float(student):
    """S grows only to a finite fp32 value: from 2^126, doubling every clean step, S stops at 2^127 (as GradScaler)."""
    config = {"init_scale": 2.0**126, "growth_interval": 1}
    pattern = [None] * 4
    options = dict(seed=10, sizes=(5,), optimizer="sgd", lr=0.1, spread=1e-3, unscale_first=False, clip=None)
    got = student.run(scaler_run, config, pattern, **options)
    scales = [state[0] for state in got["state"]]
    assert scales == [2.0**127] * 4 and all(math.isfinite(s) for s in scales), (
        f"scales from 2^126 with growth every step: {scales}; expected 2^127 every time (2^128 overflows fp32)")
    _compare(got, _expected(config, pattern, **options), pattern, what="DynamicLossScaler at the fp32 ceiling")
