"""Lab 02, part 1a: the dynamic loss scaler (loss_scaler.py): skip, back off, grow, and follow GradScaler exactly."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


def _poisoned_backward(loss_scaler_or_grad_scaler, param, target, poison):
    """Backward of a scaled quadratic loss; then write inf or NaN into the gradient when asked (an overflow)."""
    loss = ((param - target) ** 2).sum()
    loss_scaler_or_grad_scaler.scale(loss).backward()
    if poison == "inf":
        param.grad[0] = float("inf")
    elif poison == "nan":
        param.grad[-1] = float("nan")


@pytest.mark.points(1)
def test_scale_multiplies_loss():
    """scale(loss) is S * loss with S = init_scale = 2^16 by default; nonsense configs are refused."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    scaler = DynamicLossScaler()
    loss = random_tensor(1, seed=0).squeeze()
    got = scaler.scale(loss)
    check_close(got, loss * 2.0**16, name="DynamicLossScaler.scale", inputs=describe(loss=loss))
    assert scaler.get_scale() == 2.0**16, f"the default initial scale must be 2^16, got {scaler.get_scale()}"
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScalerConfig(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval"):
        LossScalerConfig(growth_interval=0)


@pytest.mark.points(3)
@pytest.mark.parametrize("poison", ["inf", "nan"])
def test_overflow_skips_step_and_halves_scale(poison):
    """An inf/NaN gradient: optimizer.step is skipped (weights unchanged), S halves, the growth counter resets."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    param = torch.nn.Parameter(random_tensor(7, seed=1))
    target = random_tensor(7, seed=2)
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=1024.0, growth_interval=5))
    # two clean steps first, so that the growth counter has something to reset
    for _ in range(2):
        optimizer.zero_grad()
        _poisoned_backward(scaler, param, target, None)
        assert scaler.step(optimizer) is True, "step() must return True when the optimizer stepped"
        scaler.update()
    assert scaler.growth_tracker == 2, f"after 2 clean steps growth_tracker should be 2, got {scaler.growth_tracker}"
    before = param.detach().clone()
    optimizer.zero_grad()
    _poisoned_backward(scaler, param, target, poison)
    stepped = scaler.step(optimizer)
    scaler.update()
    assert stepped is False, f"step() must return False (skipped) when a gradient is {poison}"
    assert torch.equal(param.detach(), before), f"a {poison} gradient must not change the weights (step skipped)"
    assert scaler.get_scale() == 512.0, f"scale after one overflow from 1024 should be 512, got {scaler.get_scale()}"
    assert scaler.growth_tracker == 0, f"an overflow must reset growth_tracker to 0, got {scaler.growth_tracker}"


@pytest.mark.points(2)
def test_scale_grows_after_interval():
    """After growth_interval clean steps in a row S doubles (and not before); gradients reach the optimizer unscaled."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    param = torch.nn.Parameter(random_tensor(5, seed=3))
    target = random_tensor(5, seed=4)
    optimizer = torch.optim.SGD([param], lr=0.05)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=8.0, growth_interval=3))
    scales = []
    for _ in range(7):
        optimizer.zero_grad()
        expected = param.detach().clone() - 0.05 * 2 * (param.detach() - target)  # SGD on the unscaled gradient
        _poisoned_backward(scaler, param, target, None)
        scaler.step(optimizer)
        scaler.update()
        check_close(param.detach(), expected, name="DynamicLossScaler.step (gradient must be unscaled)",
                    inputs=describe(param=param))
        scales.append(scaler.get_scale())
    assert scales == [8, 8, 16, 16, 16, 32, 32], f"scale after each of 7 clean steps (interval 3): {scales}"


@pytest.mark.points(4)
def test_matches_gradscaler_trajectory():
    """Same overflow pattern, same optimizer: scale and weights follow torch.amp.GradScaler step for step."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    pattern = torch.rand(40, generator=torch.Generator().manual_seed(5)) < 0.3
    runs = {}
    for kind in ("ours", "torch"):
        param = torch.nn.Parameter(random_tensor(6, seed=6))
        target = random_tensor(6, seed=7)
        optimizer = torch.optim.Adam([param], lr=0.01)
        if kind == "ours":
            scaler = DynamicLossScaler(LossScalerConfig(init_scale=2.0**10, growth_interval=3))
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        scales, weights = [], []
        for step, overflow in enumerate(pattern.tolist()):
            optimizer.zero_grad()
            _poisoned_backward(scaler, param, target, "inf" if overflow else None)
            scaler.step(optimizer)
            scaler.update()
            scales.append(float(scaler.get_scale()))
            weights.append(param.detach().clone())
        runs[kind] = scales, weights
    ours, theirs = runs["ours"], runs["torch"]
    for step in range(len(pattern)):
        assert ours[0][step] == theirs[0][step], (
            f"scale differs from GradScaler at step {step} (overflow pattern {pattern.int().tolist()}): "
            f"ours {ours[0][:step + 1]}, GradScaler {theirs[0][:step + 1]}")
        check_close(ours[1][step], theirs[1][step], name=f"weights after step {step} vs GradScaler",
                    inputs=describe(overflow_pattern=pattern.int().tolist()))


@pytest.mark.points(2)
def test_unscale_before_clipping():
    """unscale_ divides the gradients by S in place and reports overflow, so clipping sees the true norm."""
    from lab02_numerics.loss_scaler import DynamicLossScaler

    param = torch.nn.Parameter(random_tensor(9, seed=8))
    target = random_tensor(9, seed=9)
    expected_grad = 2 * (param.detach() - target)
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = DynamicLossScaler()
    _poisoned_backward(scaler, param, target, None)
    found = scaler.unscale_(optimizer)
    assert found is False, "unscale_ must return False when every gradient is finite"
    check_close(param.grad, expected_grad, name="DynamicLossScaler.unscale_", inputs=describe(param=param))
    norm = torch.nn.utils.clip_grad_norm_([param], max_norm=0.5)
    check_close(norm, expected_grad.norm(), name="clip_grad_norm_ after unscale_ (the true norm)")
    with pytest.raises(RuntimeError, match="already"):
        scaler.unscale_(optimizer)  # twice in one iteration would divide by S twice
