"""Lab 01, part 1: the checkpoint autograd.Function (checkpoint.py).

Producers (the functions above the tests) run in the grading worker, where the submission is importable; the tests
compute what is expected here, from the plain function, and compare.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

WIDTH = 12


def _mlp(seed: int, width: int = WIDTH, dropout: float = 0.0):
    """A two-layer MLP with its own parameters, as a plain function of (x, scale)."""
    torch.manual_seed(seed)
    first = torch.nn.Linear(width, 2 * width).double()
    second = torch.nn.Linear(2 * width, width).double()
    drop = torch.nn.Dropout(dropout)

    def function(x, scale=1.0):
        return second(drop(torch.tanh(first(x)))) * scale

    return function, [*first.parameters(), *second.parameters()]


def _forward_backward(x: torch.Tensor, *, seed: int, dropout: float, rng_seed: int, wrap=None,
                      draw_between: int = 0, **kwargs) -> dict:
    """Output, input and parameter gradients of the MLP (optionally run through `wrap`, i.e. checkpoint), and the
    next random draws after backward. `draw_between` random numbers are drawn between forward and backward."""
    function, params = _mlp(seed, dropout=dropout)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(rng_seed)
    y = wrap(function, x, **kwargs) if wrap is not None else function(x)
    between = torch.rand(draw_between) if draw_between else torch.empty(0)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "params": [p.grad for p in params], "between": between,
            "after": torch.rand(4)}


# -----------------------------------------------------------------------------
# Producers: run in the worker


def checkpointed_mlp(x: torch.Tensor, *, seed: int, dropout: float = 0.0, rng_seed: int = 0, draw_between: int = 0,
                     **kwargs) -> dict:
    from lab01_memory.checkpoint import checkpoint

    return _forward_backward(x, seed=seed, dropout=dropout, rng_seed=rng_seed, wrap=checkpoint,
                             draw_between=draw_between, **kwargs)


def call_count_and_grad_modes(seed: int) -> list[bool]:
    """Grad mode at each call of the checkpointed function, over one forward and backward."""
    from lab01_memory.checkpoint import checkpoint

    function, _ = _mlp(seed)
    calls = []

    def counted(x):
        calls.append(torch.is_grad_enabled())
        return function(x)

    x = random_tensor(3, WIDTH, dtype=torch.float64, seed=seed).requires_grad_(True)
    checkpoint(counted, x).sum().backward()
    return calls


def extras_and_inputs_without_grad(seed: int) -> dict:
    """Non-tensor arguments pass through; an input without requires_grad gets no gradient."""
    from lab01_memory.checkpoint import checkpoint

    function, params = _mlp(seed)
    x = random_tensor(4, WIDTH, dtype=torch.float64, seed=seed + 1).requires_grad_(True)
    bias = random_tensor(4, WIDTH, dtype=torch.float64, seed=seed + 2)  # requires_grad=False
    seen = []

    def with_extras(x, bias, scale, note):
        seen.append(note)
        return function(x + bias, scale)

    y = checkpoint(with_extras, x, bias, 2.5, "not a tensor")
    y.sum().backward()
    return {"y": y.detach(), "dx": x.grad, "params": [p.grad for p in params], "bias_grad": bias.grad,
            "notes": seen}


def outputs_without_gradient(seed: int, use_checkpoint: bool) -> dict:
    """A function returning (a tensor that needs grad, an integer tensor that cannot have one)."""
    if use_checkpoint:
        from lab01_memory.checkpoint import checkpoint
    function, params = _mlp(seed)

    def with_index(x):
        y = function(x)
        return y, y.argmax(dim=-1)

    x = random_tensor(5, WIDTH, dtype=torch.float64, seed=seed).requires_grad_(True)
    y, index = checkpoint(with_index, x) if use_checkpoint else with_index(x)
    (y * y).sum().backward()
    return {"index": index, "dx": x.grad, "params": [p.grad for p in params]}


def saved_bytes_under_checkpoint(seed: int, rows: int) -> dict:
    from common.measure import SavedTensorMeter
    from lab01_memory.checkpoint import checkpoint

    function, params = _mlp(seed, width=32)
    x = random_tensor(rows, 32, dtype=torch.float64, seed=seed).requires_grad_(True)
    with SavedTensorMeter(exclude=params) as checkpointed:
        checkpoint(function, x)
    return {"saved": checkpointed.total_bytes, "input": x.untyped_storage().nbytes()}


def checkpoint_non_callable() -> None:
    from lab01_memory.checkpoint import checkpoint

    checkpoint(42, torch.ones(2, requires_grad=True))


def autocast_cpu_gradients(seed: int, use_checkpoint: bool) -> dict:
    """Gradients of the MLP (fp32) under CPU bf16 autocast, checkpointed or not: the recompute must replay autocast."""
    if use_checkpoint:
        from lab01_memory.checkpoint import checkpoint
    torch.manual_seed(seed)
    first, second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def function(x):
        return second(torch.relu(first(x)))

    x = random_tensor(8, 16, seed=seed).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = checkpoint(function, x) if use_checkpoint else function(x)
    y.float().pow(2).sum().backward()
    return {"y_dtype": y.dtype, "dx": x.grad, "w1": first.weight.grad, "w2": second.weight.grad,
            "autocast_leaked": torch.is_autocast_enabled("cpu")}


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _check_against_plain(got: dict, want: dict, *, what: str, inputs: str) -> None:
    check_close(got["y"], want["y"], name=f"{what} (output)", inputs=inputs)
    check_close(got["dx"], want["dx"], name=f"{what} (gradient of x)", inputs=inputs)
    for index, (have, expect) in enumerate(zip(got["params"], want["params"])):
        check_close(have, expect, name=f"{what} (gradient of parameter {index})", inputs=inputs)


@pytest.mark.points(4)
def test_gradients_match_without_checkpoint(student):
    """checkpoint gives the same output, input gradient and parameter gradients as the plain function (fp64)."""
    x = random_tensor(5, WIDTH, dtype=torch.float64, seed=2)
    got = student.run(checkpointed_mlp, x, seed=1)
    want = _forward_backward(x, seed=1, dropout=0.0, rng_seed=0)
    _check_against_plain(got, want, what="checkpoint", inputs=describe(x=x))


@pytest.mark.points(4)
def test_dropout_replays_the_same_mask(student):
    """With dropout, the recompute must restore the RNG state, so gradients still match exactly."""
    x = random_tensor(6, WIDTH, dtype=torch.float64, seed=4)
    got = student.run(checkpointed_mlp, x, seed=3, dropout=0.5, rng_seed=7)
    want = _forward_backward(x, seed=3, dropout=0.5, rng_seed=7)
    _check_against_plain(got, want, what="checkpoint with dropout 0.5 (is the RNG state restored for the recompute?)",
                         inputs=describe(x=x, dropout=0.5))


@pytest.mark.points(2)
def test_recompute_puts_the_callers_rng_back(student):
    """The recompute draws from the saved RNG state, then puts the caller's state back: random draws made between
    forward and backward, and after backward, are those of an un-checkpointed run."""
    x = random_tensor(4, WIDTH, dtype=torch.float64, seed=6)
    got = student.run(checkpointed_mlp, x, seed=5, dropout=0.3, rng_seed=11, draw_between=5)
    want = _forward_backward(x, seed=5, dropout=0.3, rng_seed=11, draw_between=5)
    _check_against_plain(got, want, what="checkpoint with dropout 0.3", inputs=describe(x=x, dropout=0.3))
    assert torch.equal(got["after"], want["after"]), (
        "checkpoint: the RNG state after backward differs from an un-checkpointed run (next draws "
        f"{got['after'].tolist()} vs {want['after'].tolist()}), with random numbers drawn between forward and "
        "backward: restore the saved state only for the recompute, then put the caller's state back "
        "(torch.random.fork_rng)")


@pytest.mark.points(1)
def test_preserve_rng_state_false_does_not_replay(student):
    """preserve_rng_state=False skips the RNG save/restore: the recompute draws a fresh dropout mask, and the caller's
    RNG stream simply continues (its documented trade-off)."""
    x = random_tensor(6, WIDTH, dtype=torch.float64, seed=8)
    got = student.run(checkpointed_mlp, x, seed=3, dropout=0.5, rng_seed=7, preserve_rng_state=False)
    replayed = _forward_backward(x, seed=3, dropout=0.5, rng_seed=7)
    check_close(got["y"], replayed["y"], name="checkpoint(preserve_rng_state=False) (output)", inputs=describe(x=x))
    assert not torch.allclose(got["dx"], replayed["dx"]), (
        "checkpoint(preserve_rng_state=False) replayed the forward's dropout mask: with the flag off, the recompute "
        "must not restore the saved RNG state")


@pytest.mark.points(2)
def test_forward_is_recomputed_exactly_once(student):
    """The function runs once in forward (under no_grad) and exactly once more in backward (with grad)."""
    calls = student.run(call_count_and_grad_modes, 8)
    assert len(calls) == 2, f"checkpoint: the function ran {len(calls)} times for one forward and backward, expected 2"
    assert calls == [False, True], (
        f"checkpoint: grad mode during the two calls was {calls}; the forward must run under no_grad "
        "(so nothing is saved) and the recompute with grad enabled")


@pytest.mark.points(2)
def test_non_tensor_arguments_and_inputs_without_grad(student):
    """Non-tensor arguments pass through; tensor inputs that need no gradient get None and cause no error."""
    got = student.run(extras_and_inputs_without_grad, 10)
    function, params = _mlp(10)
    x = random_tensor(4, WIDTH, dtype=torch.float64, seed=11).requires_grad_(True)
    bias = random_tensor(4, WIDTH, dtype=torch.float64, seed=12)
    y = function(x + bias, 2.5)
    y.sum().backward()
    want = {"y": y.detach(), "dx": x.grad, "params": [p.grad for p in params]}
    _check_against_plain(got, want, what="checkpoint with non-tensor arguments",
                         inputs=describe(x=x, bias=bias, scale=2.5))
    assert got["bias_grad"] is None, "checkpoint: an input with requires_grad=False must not receive a gradient"
    assert got["notes"] == ["not a tensor", "not a tensor"], (
        f"checkpoint: the non-tensor argument reached the function as {got['notes']}, expected it unchanged twice")


@pytest.mark.points(1)
def test_outputs_that_need_no_gradient(student):
    """An output that cannot carry a gradient (an argmax index) is returned as is and skipped in backward."""
    got = student.run(outputs_without_gradient, 14, True)
    want = outputs_without_gradient(14, False)
    assert torch.equal(got["index"], want["index"]), "checkpoint: the integer output differs from the function's"
    check_close(got["dx"], want["dx"], name="checkpoint with an integer output (gradient of x)",
                inputs=describe(x=(5, WIDTH)))
    for index, (have, expect) in enumerate(zip(got["params"], want["params"])):
        check_close(have, expect, name=f"checkpoint with an integer output (parameter {index})",
                    inputs=describe(x=(5, WIDTH)))


@pytest.mark.points(1)
@pytest.mark.parametrize("rows", [64, 7])
def test_saves_only_inputs(student, rows):
    """Under checkpoint, the forward keeps only the inputs for backward (the whole point)."""
    got = student.run(saved_bytes_under_checkpoint, 13, rows)
    assert got["saved"] == got["input"], (
        f"checkpoint saved {got['saved']} bytes of activations for an input of {rows}x32 fp64; only the input "
        f"({got['input']} bytes) should be kept")


@pytest.mark.points(1)
def test_rejects_a_non_callable(student):
    with pytest.raises(TypeError, match="callable"):
        student.run(checkpoint_non_callable)


@pytest.mark.points(2)
def test_cpu_bf16_autocast_is_replayed(student):
    """Under CPU bf16 autocast, the recompute runs under the same autocast: gradients equal the plain run's (which
    are bf16-rounded, so a recompute in fp32 would differ), and backward leaves autocast as it found it."""
    got = student.run(autocast_cpu_gradients, 21, True)
    want = autocast_cpu_gradients(21, False)
    assert got["y_dtype"] == torch.bfloat16, f"checkpoint under autocast returned {got['y_dtype']}, expected bfloat16"
    for key in ("dx", "w1", "w2"):
        # the same bf16 computation, replayed: equal to fp32 rounding, far tighter than bf16's own error
        check_close(got[key], want[key], name=f"checkpoint under CPU bf16 autocast ({key})",
                    inputs=describe(x=(8, 16), autocast="cpu bf16"), dtype=torch.float32, rtol=1e-4, atol=1e-5)
    assert got["autocast_leaked"] is False, (
        "checkpoint: CPU autocast is still enabled after backward, outside any autocast region: the recompute must "
        "leave the autocast state as it found it")
