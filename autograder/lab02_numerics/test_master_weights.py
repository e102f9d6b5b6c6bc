"""Lab 02, part 1b: fp32 master weights and the autocast training step (master_weights.py).

Producers run the student's optimizer and training step in the worker and return the weights after every step; the
tests replay the same steps here with torch alone (fp32 copies stepped by torch.optim, torch.amp.GradScaler, autocast)
and compare the exact values, not just "the model changed".
"""

import pytest
import torch
import torch.nn as nn

from common.testing import check_close, corpus_batch, describe, random_tensor, tiny_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# -----------------------------------------------------------------------------
# A half-precision model, built the same way in the worker and in the grader


class _Net(nn.Module):
    """A Linear layer plus a frozen offset (requires_grad=False) and a parameter the loss never uses."""

    def __init__(self, spec: dict):
        super().__init__()
        torch.manual_seed(spec["seed"])
        self.linear = nn.Linear(spec["in_features"], spec["out_features"], bias=spec.get("bias", True))
        with torch.no_grad():
            self.linear.weight.copy_(spec.get("center", 0.0) + spec.get("spread", 1.0) * random_tensor(
                spec["out_features"], spec["in_features"], seed=spec["seed"] + 1))
        self.offset = nn.Parameter(0.1 * random_tensor(spec["out_features"], seed=spec["seed"] + 2),
                                   requires_grad=False)
        self.unused = nn.Parameter(random_tensor(3, seed=spec["seed"] + 3)) if spec.get("unused") else None

    def forward(self, x):
        return self.linear(x) + self.offset


def _build(spec: dict) -> tuple[_Net, torch.Tensor]:
    model = _Net(spec).to(DTYPES[spec["dtype"]])
    x = random_tensor(spec["batch"], spec["in_features"], seed=spec["seed"] + 4, dtype=DTYPES[spec["dtype"]])
    return model, x


def _loss(model: _Net, x: torch.Tensor, spec: dict) -> torch.Tensor:
    return model(x).float().pow(2).mean() * spec.get("loss_weight", 1.0)


def _optimizer(spec: dict, params: list):
    if spec["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.1)
    return torch.optim.SGD(params, lr=spec["lr"])


def _trainable(model: _Net) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Producers: run in the worker


def small_updates(start: float, update: float, steps: int, dtype: str) -> dict:
    from lab02_numerics.master_weights import simulate_small_updates

    return simulate_small_updates(start=start, update=update, steps=steps, dtype=DTYPES[dtype])


def master_run(spec: dict) -> dict:
    """MasterWeightOptimizer over the half model for spec["steps"] steps; the masters and the model after each."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig
    from lab02_numerics.master_weights import MasterWeightOptimizer

    model, x = _build(spec)
    scaler = DynamicLossScaler(LossScalerConfig(**spec["scaler"])) if spec.get("scaler") else None
    opt = MasterWeightOptimizer(model, lambda params: _optimizer(spec, params), scaler=scaler)
    masters = list(opt.master_params)
    trainable = _trainable(model)
    out = {
        "master_dtypes": [str(m.dtype) for m in masters],
        "masters_are_leaves": all(m.is_leaf for m in masters),
        "shared": any(m.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                      for m, p in zip(masters, trainable)),
        "optimizer_holds_masters": [p is m for p, m in zip(opt.optimizer.param_groups[0]["params"], masters)],
        "initial_masters": [m.detach().clone() for m in masters],
        "masters": [], "model": [], "stepped": [], "master_grads_left": [], "scale": [],
    }
    for step in range(spec["steps"]):
        opt.zero_grad()
        loss = _loss(model, x, spec)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if step in spec.get("overflow_at", ()):
            model.linear.bias.grad[0] = float("inf")
        out["stepped"].append(opt.step())
        out["masters"].append([m.detach().clone() for m in masters])
        out["model"].append([p.detach().clone() for p in trainable])
        out["master_grads_left"].append(sum(m.grad is not None for m in masters))
        out["scale"].append(float(scaler.get_scale()) if scaler is not None else None)
    return out


def master_error(spec: dict) -> None:
    from lab02_numerics.master_weights import MasterWeightOptimizer

    model, _ = _build(spec)
    if spec.get("one_fp32"):
        model.linear.bias.data = model.linear.bias.data.float()
    MasterWeightOptimizer(model, lambda params: torch.optim.SGD(params, lr=0.1))


def train_steps(precision: str, *, steps: int = 1, max_grad_norm: float | None = None, scaler: dict | None = None,
                lr: float = 0.5, stale_grads: bool = False, seed: int = 0) -> dict:
    """train_step on the tiny fp32 model `steps` times; the losses, the parameters and the scaler after each."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig
    from lab02_numerics.master_weights import train_step

    model = tiny_model(num_layers=2, seed=seed, dtype=torch.float32)
    tokens, targets = corpus_batch(batch_size=2, seq_len=16, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    the_scaler = DynamicLossScaler(LossScalerConfig(**scaler)) if scaler is not None else None
    if stale_grads:  # left over from an earlier step: train_step must start from clean gradients
        for index, p in enumerate(model.parameters()):
            p.grad = random_tensor(*p.shape, seed=100 + index)
    out = {"losses": [], "params": [], "scales": [], "dtypes": set()}
    for _ in range(steps):
        loss = train_step(model, tokens, targets, optimizer, precision=precision, scaler=the_scaler,
                          max_grad_norm=max_grad_norm)
        out["losses"].append({"value": loss.detach().clone(), "dtype": str(loss.dtype), "shape": tuple(loss.shape),
                              "requires_grad": loss.requires_grad})
        out["params"].append({name: p.detach().clone() for name, p in model.named_parameters()})
        out["scales"].append(float(the_scaler.get_scale()) if the_scaler is not None else None)
        out["dtypes"] |= {str(p.dtype) for p in model.parameters()}
    out["dtypes"] = sorted(out["dtypes"])
    return out


def train_step_error(precision: str, with_scaler: bool) -> None:
    from lab02_numerics.loss_scaler import DynamicLossScaler
    from lab02_numerics.master_weights import train_step

    model = tiny_model(num_layers=1, dtype=torch.float32)
    tokens, targets = corpus_batch(batch_size=2, seq_len=8)
    train_step(model, tokens, targets, torch.optim.SGD(model.parameters(), lr=0.1), precision=precision,
               scaler=DynamicLossScaler() if with_scaler else None)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _simulate_masters(spec: dict) -> dict:
    """The same steps with torch only: fp32 copies stepped by torch.optim, GradScaler for the scaling."""
    model, x = _build(spec)
    trainable = _trainable(model)
    masters = [p.detach().float().clone() for p in trainable]
    optimizer = _optimizer(spec, masters)
    scaler = torch.amp.GradScaler("cpu", **spec["scaler"]) if spec.get("scaler") else None
    out = {"masters": [], "model": [], "stepped": [], "scale": []}
    for step in range(spec["steps"]):
        for p in trainable:
            p.grad = None
        loss = _loss(model, x, spec)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        overflow = step in spec.get("overflow_at", ())
        if overflow:
            model.linear.bias.grad[0] = float("inf")
        for master, p in zip(masters, trainable):
            master.grad = None if p.grad is None else p.grad.detach().float()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if not overflow:
            with torch.no_grad():
                for master, p in zip(masters, trainable):
                    p.copy_(master)
        out["masters"].append([m.detach().clone() for m in masters])
        out["model"].append([p.detach().clone() for p in trainable])
        out["stepped"].append(not overflow)
        out["scale"].append(float(scaler.get_scale()) if scaler is not None else None)
    return out


def _check_master_run(got: dict, spec: dict, *, what: str) -> None:
    want = _simulate_masters(spec)
    model, _ = _build(spec)
    trainable = _trainable(model)
    inputs = describe(**{k: v for k, v in spec.items() if k in ("dtype", "optimizer", "lr", "scaler", "overflow_at")})
    assert len(got["master_dtypes"]) == len(trainable), (
        f"{what}: {len(got['master_dtypes'])} master parameters for {len(trainable)} trainable model parameters "
        "(one fp32 master per parameter with requires_grad)")
    assert got["master_dtypes"] == ["torch.float32"] * len(trainable), f"{what}: masters must be fp32, got " \
                                                                       f"{got['master_dtypes']}"
    assert got["masters_are_leaves"] and not got["shared"], f"{what}: the masters must be separate fp32 leaf tensors"
    assert all(got["optimizer_holds_masters"]), f"{what}: make_optimizer must be given the master parameters"
    for index, p in enumerate(trainable):
        check_close(got["initial_masters"][index], p.detach().double(), name=f"{what}: initial master {index}",
                    inputs=inputs, rtol=0, atol=0)
    for step in range(spec["steps"]):
        assert got["stepped"][step] is want["stepped"][step], (
            f"{what}: step() returned {got['stepped'][step]!r} at step {step}, expected {want['stepped'][step]!r}")
        assert got["scale"][step] == want["scale"][step], (
            f"{what}: loss scale after step {step} is {got['scale'][step]}, expected {want['scale'][step]}")
        assert got["master_grads_left"][step] == 0, (
            f"{what}: after step {step}, {got['master_grads_left'][step]} masters still hold an fp32 .grad; the "
            "gradient copy is transient (2 + 2 + 12 bytes per parameter, not 2 + 2 + 4 + 12)")
        for index, p in enumerate(trainable):
            # compare the updates, not the weights: an update of 1e-5 on a weight of 1.0 is below fp32's tolerance
            start = p.detach().float()
            delta = want["masters"][step][index] - start
            check_close(got["masters"][step][index] - start, delta, name=f"{what}: master {index} after step {step} "
                        "(its change from the initial weight)", inputs=inputs, rtol=1e-5,
                        atol=1e-6 * (float(delta.abs().max()) or 1.0))
            check_close(got["model"][step][index], want["model"][step][index].double(),
                        name=f"{what}: model parameter {index} after step {step} (= the master rounded)",
                        inputs=inputs, rtol=0, atol=0)


@pytest.mark.points(3)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_small_updates_survive_with_master(student, dtype):
    """Updates below half an ulp vanish in pure low precision and survive with a master; updates above half an ulp
    round up every time in low precision (too large), while the master keeps the exact sum."""
    torch_dtype = DTYPES[dtype]
    for start, update, steps in [(1.0, 1e-4 if dtype == "float16" else 1e-3, 100), (1.0, 0.006, 10), (-2.0, 3e-3, 7),
                                 (0.5, 0.0, 0), (1.0, 1e-4, 0)]:
        got = student.run(small_updates, start, update, steps, dtype)
        low = torch.tensor(start, dtype=torch_dtype)
        master = torch.tensor(start).float()
        for _ in range(steps):
            low = (low + torch.tensor(update, dtype=torch.float32).to(torch_dtype)).to(torch_dtype)
            master = master + torch.tensor(update, dtype=torch.float32)
        want = {"low_precision": float(low), "master": float(master.to(torch_dtype)),
                "exact": start + steps * update}
        case = f"simulate_small_updates(start={start}, update={update}, steps={steps}, dtype={dtype})"
        assert isinstance(got, dict) and set(got) >= set(want), f"{case} must return a dict with keys {sorted(want)}"
        assert abs(got["exact"] - want["exact"]) < 1e-12, f"{case}: 'exact' is {got['exact']}, expected {want['exact']}"
        assert got["low_precision"] == want["low_precision"], (
            f"{case}: 'low_precision' is {got['low_precision']}, expected {want['low_precision']} (the weight kept in "
            f"{dtype}, rounded after every add)")
        assert got["master"] == want["master"], (
            f"{case}: 'master' is {got['master']}, expected {want['master']} (an fp32 master, the model copy "
            f"fl(W) read at the end)")
    with pytest.raises(TypeError, match="dtype"):
        student.run(small_updates, 1.0, 1e-4, 1, "float32")


SMALL_SGD = dict(seed=1, in_features=12, out_features=5, bias=False, dtype="float16", batch=4, center=1.0,
                 spread=0.01, loss_weight=0.01, optimizer="sgd", lr=1e-2, steps=50)


@pytest.mark.points(3)
def test_master_optimizer_keeps_small_updates(student):
    """An fp16 model stepped through fp32 masters: the masters follow fp32 SGD exactly, the model is their rounding,
    and 50 steps too small for fp16 (lr * g ~ 1e-5 < ulp16(1) / 2) still move the weights."""
    got = student.run(master_run, SMALL_SGD)
    _check_master_run(got, SMALL_SGD, what="MasterWeightOptimizer (fp16, SGD)")
    start = got["initial_masters"][0].half()
    moved = (got["model"][-1][0] != start).float().mean().item()
    assert moved > 0.2, f"after 50 small steps only {moved:.0%} of the fp16 weights moved: the updates were lost"


SCALED_BF16 = dict(seed=3, in_features=6, out_features=3, dtype="bfloat16", batch=5, optimizer="sgd", lr=0.1,
                   scaler={"init_scale": 256.0}, steps=3, overflow_at=(1,))


@pytest.mark.points(2)
def test_master_optimizer_with_scaler_skips_overflow(student):
    """With a loss scaler: gradients are unscaled once (the masters after a step are exactly SGD's on g, not g / S or
    g * S); an inf gradient skips the step (model and masters unchanged) and halves the scale."""
    got = student.run(master_run, SCALED_BF16)
    _check_master_run(got, SCALED_BF16, what="MasterWeightOptimizer (bf16, SGD, loss scaler)")
    with pytest.raises(TypeError, match="fp16 or bf16"):
        student.run(master_error, dict(SCALED_BF16, dtype="float32"))
    with pytest.raises(TypeError, match="fp16 or bf16"):
        student.run(master_error, dict(SCALED_BF16, one_fp32=True))


ADAMW_FP16 = dict(seed=5, in_features=10, out_features=7, dtype="float16", batch=6, optimizer="adamw", lr=1e-2,
                  unused=True, scaler={"init_scale": 2.0**10, "growth_interval": 2}, steps=6, overflow_at=(2,))


@pytest.mark.points(2)
def test_master_optimizer_adamw_exact(student):
    """AdamW (weight decay) on the masters of an fp16 model with a frozen parameter (no master) and an unused one
    (no gradient, so not stepped), a loss scaler that grows and backs off: every master and model value after every
    step equals torch's AdamW on fp32 copies fed the once-unscaled gradients."""
    got = student.run(master_run, ADAMW_FP16)
    _check_master_run(got, ADAMW_FP16, what="MasterWeightOptimizer (fp16, AdamW, loss scaler)")


def _simulate_train(precision: str, *, steps: int = 1, max_grad_norm=None, scaler=None, lr: float = 0.5,
                    stale_grads: bool = False, seed: int = 0) -> dict:
    """The documented step with torch alone: zero the grads, autocast forward, (scaled) backward, unscale, clip,
    step, update."""
    model = tiny_model(num_layers=2, seed=seed, dtype=torch.float32)
    tokens, targets = corpus_batch(batch_size=2, seq_len=16, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    grad_scaler = torch.amp.GradScaler("cpu", **scaler) if scaler is not None else None
    out = {"losses": [], "params": [], "scales": [],
           "initial": {name: p.detach().clone() for name, p in model.named_parameters()}}
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model.loss(tokens, targets)
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            if max_grad_norm:  # 0.5 or 0.05 here, or None
                grad_scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(list(model.parameters()), max_norm=max_grad_norm)
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            if max_grad_norm:  # 0.5 or 0.05 here, or None
                nn.utils.clip_grad_norm_(list(model.parameters()), max_norm=max_grad_norm)
            optimizer.step()
        out["losses"].append(loss.detach().float())
        out["params"].append({name: p.detach().clone() for name, p in model.named_parameters()})
        out["scales"].append(float(grad_scaler.get_scale()) if grad_scaler is not None else None)
    return out


def _check_train(got: dict, precision: str, **options) -> None:
    want = _simulate_train(precision, **options)
    tokens, _ = corpus_batch(batch_size=2, seq_len=16, seed=options.get("seed", 0))
    inputs = describe(tokens=tokens, precision=precision, **options)
    assert got["dtypes"] == ["torch.float32"], f"train_step({precision}) must keep fp32 parameters, found " \
                                               f"{got['dtypes']}"
    before = want["initial"]
    for step in range(len(want["losses"])):
        loss = got["losses"][step]
        assert loss["shape"] == () and loss["dtype"] == "torch.float32" and not loss["requires_grad"], (
            f"train_step({precision}) must return a detached fp32 scalar, got shape {loss['shape']}, "
            f"{loss['dtype']}, requires_grad={loss['requires_grad']}")
        check_close(loss["value"], want["losses"][step], name=f"train_step({precision}) loss at step {step}",
                    inputs=inputs, rtol=1e-4, atol=1e-6)
        assert got["scales"][step] == want["scales"][step], (
            f"train_step({precision}): loss scale after step {step} is {got['scales'][step]}, expected "
            f"{want['scales'][step]}")
        # the update itself (not the weights, which barely move) must be the documented step's
        for name, expected in want["params"][step].items():
            delta = expected - before[name]
            scale = float(delta.abs().max()) or 1.0
            check_close(got["params"][step][name] - before[name], delta,
                        name=f"train_step({precision}): update of {name} at step {step}", inputs=inputs,
                        rtol=1e-3, atol=1e-4 * scale)
        before = want["params"][step]


@pytest.mark.points(3)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_train_step(student, precision):
    """train_step under bf16/fp16 autocast (two steps, clipping that binds, stale gradients on entry): the loss and
    the update equal torch's autocast step (fp16 with the scaler: scale, backward, unscale, clip, step, update)."""
    options = dict(steps=2, max_grad_norm=0.5, stale_grads=True,
                   scaler={"init_scale": 2.0**12, "growth_interval": 1} if precision == "fp16" else None)
    got = student.run(train_steps, precision, **options)
    _check_train(got, precision, **options)


@pytest.mark.points(2)
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_fp32_train_step_clips_and_zeroes(student, precision):
    """fp32 and tf32 steps: gradients start from zero (stale .grad is cleared), clipping to 0.05 binds, and the
    update and the returned (pre-update) loss equal the plain step's."""
    options = dict(steps=2, max_grad_norm=0.05, stale_grads=True, lr=0.3, seed=1)
    got = student.run(train_steps, precision, **options)
    _check_train(got, precision, **options)


@pytest.mark.points(1)
def test_train_step_errors(student):
    """An unknown precision, fp16 without a scaler, and a scaler with any other precision are ValueErrors."""
    with pytest.raises(ValueError, match="precision"):
        student.run(train_step_error, "fp8", False)
    with pytest.raises(ValueError, match="scaler"):
        student.run(train_step_error, "fp16", False)
    with pytest.raises(ValueError, match="scaler"):
        student.run(train_step_error, "bf16", True)
    with pytest.raises(ValueError, match="scaler"):
        student.run(train_step_error, "fp32", True)
