"""Lab 02, part 1b: fp32 master weights and the autocast training step (master_weights.py)."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(3)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_updates_survive_with_master(dtype):
    """100 updates of 1e-4 (fp16) or 1e-3 (bf16) to a weight of 1.0: lost in pure low precision, kept with a master."""
    from lab02_numerics.master_weights import simulate_small_updates

    update = 1e-4 if dtype == torch.float16 else 1e-3  # both below half an ulp at 1.0 (2^-11 and 2^-8)
    result = simulate_small_updates(start=1.0, update=update, steps=100, dtype=dtype)
    assert result["low_precision"] == 1.0, (
        f"simulate_small_updates({dtype}): in pure {dtype} every update of {update} rounds away, so the weight must "
        f"stay exactly 1.0; got {result['low_precision']}")
    exact = 1.0 + 100 * update
    assert abs(result["exact"] - exact) < 1e-12, f"'exact' should be start + steps * update = {exact}"
    ulp = torch.finfo(dtype).eps * 2  # spacing just above 1.0..2.0 is eps; the result may round to either side
    assert abs(result["master"] - exact) <= ulp, (
        f"simulate_small_updates({dtype}): with an fp32 master the weight must reach ~{exact} "
        f"(within one {dtype} ulp {ulp:.3g}); got {result['master']}")
    with pytest.raises(TypeError, match="dtype"):
        simulate_small_updates(start=1.0, update=1e-4, steps=1, dtype=torch.float32)


@pytest.mark.points(3)
def test_master_optimizer_keeps_small_updates():
    """An fp16 model stepped through fp32 masters: the masters follow fp32 SGD exactly, the model is their rounding,
    and 50 steps too small for fp16 still move the weights."""
    from lab02_numerics.master_weights import MasterWeightOptimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5, bias=False)
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.01 * random_tensor(5, 12, seed=1))  # weights near 1.0, where ulp16 ~ 1e-3
    model = layer.half()
    opt = MasterWeightOptimizer(model, lambda params: torch.optim.SGD(params, lr=1e-2))
    assert all(m.dtype == torch.float32 for m in opt.master_params), "master_params must be fp32"
    assert opt.master_params[0].data_ptr() != model.weight.data_ptr(), "the masters must be a separate copy"
    x = random_tensor(4, 12, seed=2, dtype=torch.float16)
    expected_master = opt.master_params[0].detach().clone()
    start = model.weight.detach().clone()
    for _ in range(50):
        opt.zero_grad()
        model(x).float().pow(2).mean().mul(0.01).backward()  # lr * g ~ 1e-5..1e-4 < ulp16(1) / 2 ~ 4.9e-4
        expected_master -= 1e-2 * model.weight.grad.float()
        assert opt.step() is True, "step() must return True without a scaler"
    check_close(opt.master_params[0].detach(), expected_master, name="MasterWeightOptimizer masters vs fp32 SGD",
                inputs=describe(x=x))
    check_close(model.weight.detach(), expected_master.half(), name="MasterWeightOptimizer model copy = fl16(master)",
                inputs=describe(x=x), rtol=0, atol=0)
    moved = (model.weight.detach() != start).float().mean().item()
    assert moved > 0.2, f"after 50 small steps only {moved:.0%} of the fp16 weights moved: the updates were lost"


@pytest.mark.points(2)
def test_master_optimizer_with_scaler_skips_overflow():
    """With a loss scaler: an inf gradient skips the step (model and masters unchanged) and halves the scale."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig
    from lab02_numerics.master_weights import MasterWeightOptimizer

    model = torch.nn.Linear(6, 3).to(torch.bfloat16)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=256.0))
    opt = MasterWeightOptimizer(model, lambda params: torch.optim.SGD(params, lr=0.1), scaler=scaler)
    x = random_tensor(5, 6, seed=3, dtype=torch.bfloat16)
    scaler.scale(model(x).float().sum()).backward()
    before = model.weight.detach().clone()
    assert opt.step() is True, "a finite scaled gradient must step"
    assert not torch.equal(before, model.weight.detach()), "a clean step must change the model"
    opt.zero_grad()
    scaler.scale(model(x).float().sum()).backward()
    model.bias.grad[0] = float("inf")
    before = model.weight.detach().clone()
    assert opt.step() is False, "an inf gradient must skip the step"
    assert torch.equal(before, model.weight.detach()), "a skipped step must leave the model unchanged"
    assert scaler.get_scale() == 128.0, f"scale should halve to 128 after the overflow, got {scaler.get_scale()}"
    with pytest.raises(TypeError, match="fp16 or bf16"):
        MasterWeightOptimizer(torch.nn.Linear(2, 2), lambda params: torch.optim.SGD(params, lr=0.1))


@pytest.mark.points(3)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_train_step(precision, make_model, make_batch):
    """train_step under bf16/fp16 autocast: parameters stay fp32, the loss matches fp32, the update matches fp32."""
    from lab02_numerics.loss_scaler import DynamicLossScaler
    from lab02_numerics.master_weights import train_step

    tokens, targets = make_batch(batch_size=2, seq_len=16)
    results = {}
    for mode in ("fp32", precision):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scaler = DynamicLossScaler() if mode == "fp16" else None
        loss = train_step(model, tokens, targets, optimizer, precision=mode, scaler=scaler, max_grad_norm=1.0)
        assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast must keep fp32 parameters"
        results[mode] = loss, model.lm_head.weight.detach().clone()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    check_close(results[precision][0], results["fp32"][0], name=f"train_step({precision}) loss vs fp32",
                inputs=describe(tokens=tokens), dtype=dtype)
    check_close(results[precision][1], results["fp32"][1], name=f"train_step({precision}) updated lm_head vs fp32",
                inputs=describe(tokens=tokens), dtype=dtype)
    model = make_model()
    with pytest.raises(ValueError, match="scaler"):
        train_step(model, tokens, targets, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16")
