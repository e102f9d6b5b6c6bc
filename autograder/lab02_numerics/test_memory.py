"""Lab 02, part 2: bytes per parameter of model states, from the ZeRO formula and measured (memory.py)."""

import pytest
import torch


@pytest.mark.points(1)
def test_zero_paper_formula():
    """(2 + 2 + 12) Psi: the ZeRO paper's 7.5 B-parameter model needs 120 GB of model states."""
    from lab02_numerics.memory import RECIPES, model_state_bytes

    assert model_state_bytes(7_500_000_000, RECIPES["mixed_adam"]) == 120_000_000_000
    assert model_state_bytes(1000, RECIPES["fp32_adam"]) == 16_000
    assert model_state_bytes(1000, RECIPES["bf16_adam"]) == 8_000
    with pytest.raises(ValueError, match="num_params"):
        model_state_bytes(-1, RECIPES["mixed_adam"])


@pytest.mark.points(2)
def test_measured_fp32_adam(make_model, make_batch):
    """An fp32 model after one Adam step holds 4 + 4 + 8 bytes per parameter, each kind measured separately."""
    from lab02_numerics.memory import RECIPES, measure_model_state_bytes, model_state_bytes

    model = make_model()
    tokens, targets = make_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.loss(tokens, targets).backward()
    optimizer.step()
    P = model.num_params()
    measured = measure_model_state_bytes(model, optimizer)
    got = (measured.params, measured.grads, measured.master, measured.optimizer)
    assert got == (4 * P, 4 * P, 0, 8 * P), f"measure_model_state_bytes (fp32 Adam, P={P}): got {got}"
    assert measured.total == model_state_bytes(P, RECIPES["fp32_adam"])


@pytest.mark.points(2)
def test_measured_mixed_adam(make_model, make_batch):
    """An fp16 model with fp32 masters and Adam on the masters holds 2 + 2 + (4 + 8) bytes per parameter."""
    from lab02_numerics.master_weights import MasterWeightOptimizer
    from lab02_numerics.memory import RECIPES, measure_model_state_bytes, model_state_bytes

    model = make_model().half()
    tokens, targets = make_batch()
    opt = MasterWeightOptimizer(model, lambda params: torch.optim.Adam(params, lr=1e-3))
    model.loss(tokens, targets).backward()
    opt.step()
    P = model.num_params()
    measured = measure_model_state_bytes(model, opt.optimizer, master_params=opt.master_params)
    got = (measured.params, measured.grads, measured.master, measured.optimizer)
    assert got == (2 * P, 2 * P, 4 * P, 8 * P), f"measure_model_state_bytes (mixed Adam, P={P}): got {got}"
    assert measured.total == model_state_bytes(P, RECIPES["mixed_adam"]) == 16 * P
