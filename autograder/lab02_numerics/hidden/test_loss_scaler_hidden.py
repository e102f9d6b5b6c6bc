"""Lab 02 hidden tests (loss scaler): other factors and intervals, against GradScaler."""

import pytest
import torch

from common.testing import check_close, random_tensor


@pytest.mark.points(2)
def test_custom_factors_match_gradscaler():
    """growth 3x, backoff 0.25, interval 2, NaN and inf overflows mixed in: the same trajectory as GradScaler."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    pattern = [None, None, "nan", None, None, None, "inf", "inf", None, None, None, None, "nan", None]
    runs = []
    for kind in ("ours", "torch"):
        param = torch.nn.Parameter(random_tensor(4, seed=50))
        optimizer = torch.optim.SGD([param], lr=0.05, momentum=0.9)
        kwargs = dict(init_scale=100.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=2)
        scaler = DynamicLossScaler(LossScalerConfig(**kwargs)) if kind == "ours" else \
            torch.amp.GradScaler("cpu", **kwargs)
        scales = []
        for poison in pattern:
            optimizer.zero_grad()
            scaler.scale(param.pow(2).sum()).backward()
            if poison:
                param.grad[1] = float(poison)
            scaler.step(optimizer)
            scaler.update()
            scales.append(float(scaler.get_scale()))
        runs.append((scales, param.detach().clone()))
    assert runs[0][0] == runs[1][0], f"scales: ours {runs[0][0]}, GradScaler {runs[1][0]}"
    check_close(runs[0][1], runs[1][1], name="weights after the run vs GradScaler")
