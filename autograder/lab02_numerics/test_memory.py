"""Lab 02, part 2: bytes per parameter of model states, from the ZeRO formula and measured (memory.py).

The grader counts the bytes itself from the model it builds (parameter counts times element sizes); the producers
return what the student's functions report.
"""

import pytest
import torch
import torch.nn as nn

from common.testing import corpus_batch, tiny_model

RECIPE_BYTES = {"fp32_adam": (4, 4, 0, 8), "mixed_adam": (2, 2, 4, 8), "bf16_adam": (2, 2, 0, 4),
                "fp32_sgd": (4, 4, 0, 0)}


class _FlatParams(nn.Module):
    """Two parameters that are views of one flat buffer (as FSDP's flat parameters are), and a separate one."""

    def __init__(self):
        super().__init__()
        flat = torch.randn(30, generator=torch.Generator().manual_seed(0))
        self.a = nn.Parameter(flat[:12])
        self.b = nn.Parameter(flat[12:])
        self.c = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(1)))

    def forward(self):
        return self.a.sum() * self.b.sum() + self.c.pow(2).sum()


# -----------------------------------------------------------------------------
# Producers: run in the worker


def predicted(num_params: int, recipe: str | tuple) -> int:
    """model_state_bytes with a named recipe, or a custom PrecisionRecipe given as its four byte counts."""
    from lab02_numerics.memory import RECIPES, PrecisionRecipe, model_state_bytes

    if isinstance(recipe, str):
        return model_state_bytes(num_params, RECIPES[recipe])
    fields = dict(zip(("param_bytes", "grad_bytes", "master_bytes", "optimizer_bytes"), recipe))
    return model_state_bytes(num_params, PrecisionRecipe(name="custom", **fields))


def measured(kind: str) -> dict:
    """measure_model_state_bytes after one optimizer step, on the tiny model set up as `kind`."""
    from lab02_numerics.master_weights import MasterWeightOptimizer
    from lab02_numerics.memory import measure_model_state_bytes

    tokens, targets = corpus_batch(batch_size=2, seq_len=16)
    masters = ()
    if kind == "flat":
        model = _FlatParams()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model().backward()
        optimizer.step()
    elif kind == "mixed_adam":
        model = tiny_model(num_layers=2, dtype=torch.float16)
        opt = MasterWeightOptimizer(model, lambda params: torch.optim.Adam(params, lr=1e-3))
        model.loss(tokens, targets).backward()
        opt.step()
        optimizer, masters = opt.optimizer, iter(opt.master_params)  # any iterable of masters
    else:
        model = tiny_model(num_layers=2, dtype=torch.float32, tie_embeddings=kind == "tied_sgd")
        if kind == "frozen_adam":
            model.embed.weight.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=1e-3) if kind.endswith("adam") else \
            torch.optim.SGD(trainable, lr=0.1)
        model.loss(tokens, targets).backward()
        optimizer.step()
    got = measure_model_state_bytes(model, optimizer, master_params=masters)
    return {"fields": (int(got.params), int(got.grads), int(got.master), int(got.optimizer)), "total": int(got.total)}


def predicted_error(num_params: int) -> None:
    from lab02_numerics.memory import RECIPES, model_state_bytes

    model_state_bytes(num_params, RECIPES["mixed_adam"])


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(1)
def test_zero_paper_formula(student):
    """(2 + 2 + 12) Psi: the ZeRO paper's 7.5 B-parameter model needs 120 GB of model states; every recipe, a custom
    one, and Psi = 0; a negative count is a ValueError."""
    assert student.run(predicted, 7_500_000_000, "mixed_adam") == 120_000_000_000
    for name, fields in RECIPE_BYTES.items():
        got = student.run(predicted, 1000, name)
        assert got == 1000 * sum(fields), f"model_state_bytes(1000, {name}) = {got}, expected {1000 * sum(fields)}"
    got = student.run(predicted, 37, (3, 5, 7, 11))
    assert got == 37 * 26, f"model_state_bytes(37, recipe 3 + 5 + 7 + 11 bytes) = {got}, expected {37 * 26}"
    assert student.run(predicted, 0, "fp32_adam") == 0, "model_state_bytes(0, ...) must be 0"
    with pytest.raises(ValueError, match="num_params"):
        student.run(predicted_error, -1)


def _count(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.points(2)
def test_measured_fp32_adam(student):
    """An fp32 model after one Adam step holds 4 + 4 + 8 bytes per parameter, each kind measured separately (Adam's
    scalar step counters are not per-parameter state)."""
    P = _count(tiny_model(num_layers=2))
    got = student.run(measured, "fp32_adam")
    assert got["fields"] == (4 * P, 4 * P, 0, 8 * P), (
        f"measure_model_state_bytes (fp32 Adam, P={P}): (params, grads, master, optimizer) = {got['fields']}, "
        f"expected {(4 * P, 4 * P, 0, 8 * P)}")
    assert got["total"] == 16 * P


@pytest.mark.points(2)
def test_measured_mixed_adam(student):
    """An fp16 model with fp32 masters and Adam on the masters holds 2 + 2 + (4 + 8) bytes per parameter."""
    P = _count(tiny_model(num_layers=2))
    got = student.run(measured, "mixed_adam")
    assert got["fields"] == (2 * P, 2 * P, 4 * P, 8 * P), (
        f"measure_model_state_bytes (mixed Adam, P={P}): (params, grads, master, optimizer) = {got['fields']}, "
        f"expected {(2 * P, 2 * P, 4 * P, 8 * P)}")
    assert got["total"] == 16 * P


@pytest.mark.points(2)
def test_measured_frozen_tied_and_shared_storage(student):
    """A frozen embedding has no gradient and no Adam state; a tied weight counts once; SGD without momentum has no
    state; two parameters that are views of one buffer count that buffer once."""
    frozen = tiny_model(num_layers=2)
    P, frozen_count = _count(frozen), frozen.embed.weight.numel()
    got = student.run(measured, "frozen_adam")
    want = (4 * P, 4 * (P - frozen_count), 0, 8 * (P - frozen_count))
    assert got["fields"] == want, f"measure_model_state_bytes (frozen embedding, Adam): {got['fields']}, " \
                                  f"expected {want}"
    tied = _count(tiny_model(num_layers=2, tie_embeddings=True))
    got = student.run(measured, "tied_sgd")
    assert got["fields"] == (4 * tied, 4 * tied, 0, 0), (
        f"measure_model_state_bytes (tied embeddings, plain SGD, {tied} parameters): {got['fields']}, expected "
        f"{(4 * tied, 4 * tied, 0, 0)}")
    got = student.run(measured, "flat")
    # a, b: one 30-float storage (120 bytes); c: 5 floats. Gradients and momentum buffers are separate tensors.
    want = (120 + 20, 4 * 35, 0, 4 * 35)
    assert got["fields"] == want, (
        f"measure_model_state_bytes (two parameters viewing one 30-float buffer, one of 5, SGD momentum): "
        f"{got['fields']}, expected {want}: each storage counts once")
    assert got["total"] == sum(want)
