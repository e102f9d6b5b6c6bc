"""Lab 01, part 1: the checkpoint autograd.Function (checkpoint.py)."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


def _mlp(seed: int, width: int = 12, dropout: float = 0.0):
    """A two-layer MLP with its own parameters, as a plain function of (x, scale)."""
    torch.manual_seed(seed)
    first = torch.nn.Linear(width, 2 * width).double()
    second = torch.nn.Linear(2 * width, width).double()
    drop = torch.nn.Dropout(dropout)

    def function(x, scale=1.0):
        return second(drop(torch.tanh(first(x)))) * scale

    return function, [*first.parameters(), *second.parameters()]


def _run(function, params, x, *, use_checkpoint, rng_seed=0, **kwargs):
    from lab01_memory.checkpoint import checkpoint

    for p in params:
        p.grad = None
    x = x.detach().requires_grad_(True)
    torch.manual_seed(rng_seed)
    y = checkpoint(function, x, **kwargs) if use_checkpoint else function(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in params]


@pytest.mark.points(4)
def test_gradients_match_without_checkpoint():
    """checkpoint gives the same output, input gradient and parameter gradients as the plain function (fp64)."""
    function, params = _mlp(seed=1)
    x = random_tensor(5, 12, dtype=torch.float64, seed=2)
    y_ref, dx_ref, dp_ref = _run(function, params, x, use_checkpoint=False)
    y, dx, dp = _run(function, params, x, use_checkpoint=True)
    inputs = describe(x=x)
    check_close(y, y_ref, name="checkpoint (output)", inputs=inputs)
    check_close(dx, dx_ref, name="checkpoint (gradient of x)", inputs=inputs)
    for index, (got, want) in enumerate(zip(dp, dp_ref)):
        check_close(got, want, name=f"checkpoint (gradient of parameter {index})", inputs=inputs)


@pytest.mark.points(4)
def test_dropout_replays_the_same_mask():
    """With dropout, the recompute must restore the RNG state, so gradients still match exactly."""
    function, params = _mlp(seed=3, dropout=0.5)
    x = random_tensor(6, 12, dtype=torch.float64, seed=4)
    _, dx_ref, dp_ref = _run(function, params, x, use_checkpoint=False, rng_seed=7)
    _, dx, dp = _run(function, params, x, use_checkpoint=True, rng_seed=7)
    inputs = describe(x=x, dropout=0.5)
    check_close(dx, dx_ref, name="checkpoint with dropout (gradient of x): is the RNG state restored?", inputs=inputs)
    for index, (got, want) in enumerate(zip(dp, dp_ref)):
        check_close(got, want, name=f"checkpoint with dropout (gradient of parameter {index})", inputs=inputs)


@pytest.mark.points(1)
def test_recompute_leaves_global_rng_alone():
    """Recomputing in backward must not advance the caller's RNG: later random draws are unchanged."""
    function, params = _mlp(seed=5, dropout=0.3)
    x = random_tensor(4, 12, dtype=torch.float64, seed=6)
    _run(function, params, x, use_checkpoint=False, rng_seed=11)
    expected = torch.rand(3)
    _run(function, params, x, use_checkpoint=True, rng_seed=11)
    got = torch.rand(3)
    assert torch.equal(got, expected), (
        "checkpoint: the RNG state after backward differs from an un-checkpointed run "
        f"(next draws {got.tolist()} vs {expected.tolist()}); restore it after the recompute (torch.random.fork_rng)"
    )


@pytest.mark.points(2)
def test_forward_is_recomputed_exactly_once():
    """The function runs once in forward and exactly once more in backward."""
    function, params = _mlp(seed=8)
    calls = []

    def counted(x):
        calls.append(torch.is_grad_enabled())
        return function(x)

    x = random_tensor(3, 12, dtype=torch.float64, seed=9)
    _run(counted, params, x, use_checkpoint=True)
    assert len(calls) == 2, f"checkpoint: the function ran {len(calls)} times for one forward and backward, expected 2"
    assert calls == [False, True], (
        f"checkpoint: grad mode during the two calls was {calls}; the forward must run under no_grad "
        "(so nothing is saved) and the recompute with grad enabled"
    )


@pytest.mark.points(2)
def test_non_tensor_arguments_and_inputs_without_grad():
    """Non-tensor arguments pass through; tensor inputs that need no gradient get None and cause no error."""
    from lab01_memory.checkpoint import checkpoint

    function, params = _mlp(seed=10)
    x = random_tensor(4, 12, dtype=torch.float64, seed=11).requires_grad_(True)
    bias = random_tensor(4, 12, dtype=torch.float64, seed=12)  # requires_grad=False

    def with_extras(x, bias, scale, note):
        assert note == "not a tensor"
        return function(x + bias, scale)

    y = checkpoint(with_extras, x, bias, 2.5, "not a tensor")
    y.sum().backward()
    dx_ckpt, dp_ckpt = x.grad.clone(), [p.grad.clone() for p in params]
    x.grad = None
    for p in params:
        p.grad = None
    with_extras(x, bias, 2.5, "not a tensor").sum().backward()
    inputs = describe(x=x, bias=bias, scale=2.5)
    check_close(dx_ckpt, x.grad, name="checkpoint with non-tensor arguments (gradient of x)", inputs=inputs)
    for index, (got, want) in enumerate(zip(dp_ckpt, [p.grad for p in params])):
        check_close(got, want, name=f"checkpoint with non-tensor arguments (parameter {index})", inputs=inputs)
    assert bias.grad is None, "checkpoint: an input with requires_grad=False must not receive a gradient"


@pytest.mark.points(1)
def test_saves_only_inputs():
    """Under checkpoint, the forward keeps only the inputs for backward (the whole point)."""
    from common.measure import SavedTensorMeter
    from lab01_memory.checkpoint import checkpoint

    function, params = _mlp(seed=13, width=32)
    x = random_tensor(64, 32, dtype=torch.float64, seed=14).requires_grad_(True)
    with SavedTensorMeter(exclude=params) as plain:
        function(x)
    with SavedTensorMeter(exclude=params) as checkpointed:
        checkpoint(function, x)
    input_bytes = x.untyped_storage().nbytes()
    assert checkpointed.total_bytes == input_bytes, (
        f"checkpoint saved {checkpointed.total_bytes} bytes of activations for input {describe(x=x)}; "
        f"only the input ({input_bytes} bytes) should be kept (the plain function saves {plain.total_bytes})"
    )


@pytest.mark.points(1)
def test_rejects_a_non_callable():
    from lab01_memory.checkpoint import checkpoint

    with pytest.raises(TypeError, match="callable"):
        checkpoint(42, torch.ones(2, requires_grad=True))
