"""Tolerances and comparisons: the one place where "close enough" is defined for every lab.

Tolerances follow from the dtype the result was computed in (docs/design.md): fp64 ~1e-10, fp32 ~1e-5 relative,
tf32 ~3e-4, bf16/fp16 ~1e-2. A check passes when |actual - expected| <= atol + rtol * |expected| everywhere.

`check_close` fails with a message a student can act on: the function, the input it was given, where the worst error
is, how large it is, and what was allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-7, atol=1e-10),
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
    "tf32": Tolerance(rtol=3e-4, atol=1e-5),
    "bfloat16": Tolerance(rtol=1.6e-2, atol=1e-2),
    "float16": Tolerance(rtol=1e-2, atol=1e-3),
}


def tolerance(dtype: torch.dtype | str) -> Tolerance:
    """The tolerance for results computed in `dtype` (a torch dtype, or "tf32")."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance defined for dtype {name!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name]


def describe(**inputs: object) -> str:
    """A short description of a test's inputs: tensors by shape and dtype, everything else by repr."""
    parts = []
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{key}={tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}")
        else:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts)


def check_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    name: str,
    inputs: str = "",
    dtype: torch.dtype | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Raise AssertionError unless `actual` matches `expected` within the dtype's tolerance.

    Args:
        actual: the student's result.
        expected: the reference result (ideally computed in float64).
        name: the function under test, e.g. "checkpoint (gradient of block 0's q_proj.weight)".
        inputs: the inputs it was given, e.g. `describe(x=x, k=2)`.
        dtype: the dtype whose tolerance applies (default: `actual.dtype`).
        rtol, atol: override the dtype's tolerance (say why at the call site).
    """
    where = f"{name}" + (f" on input {inputs}" if inputs else "")
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{where}: expected a tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{where}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = tolerance(dtype if dtype is not None else actual.dtype)
    rtol = tol.rtol if rtol is None else rtol
    atol = tol.atol if atol is None else atol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        bad = (~torch.isfinite(a)).nonzero()[0].tolist()
        raise AssertionError(f"{where}: non-finite value {a[tuple(bad)].item()} at index {bad}")
    if a.numel() == 0:
        return
    error = (a - e).abs()
    allowed = atol + rtol * e.abs()
    excess = error - allowed
    if (excess > 0).any():
        worst = torch.unravel_index(excess.argmax(), excess.shape)
        index = [int(i) for i in worst]
        num_bad = int((excess > 0).sum())
        raise AssertionError(
            f"{where}: {num_bad} of {a.numel()} elements differ; worst at index {index}: "
            f"got {a[tuple(index)].item():.6g}, expected {e[tuple(index)].item():.6g} "
            f"(abs error {error[tuple(index)].item():.3g}, allowed {allowed[tuple(index)].item():.3g} = "
            f"atol {atol:g} + rtol {rtol:g} * |expected|); max abs error overall {error.max().item():.3g}"
        )


def random_tensor(*shape: int, dtype: torch.dtype = torch.float32, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal test data from a private generator (never zeros, never the global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


# -----------------------------------------------------------------------------
# Builders that graded tests share: the grader computes expectations with them, and producers (in the worker)
# build the same models and batches from the same seeds.


def tiny_model(*, num_layers: int = 4, dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float64,
               max_seq_len: int = 32, **overrides):
    """The "tiny" preset of common.model, seeded, in `dtype` (fp64 by default: exact gradient comparisons)."""
    from common.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny", num_layers=num_layers, dropout=dropout, max_seq_len=max_seq_len, **overrides)
    return Transformer(config).to(dtype)


def corpus_batch(*, batch_size: int = 3, seq_len: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) of the embedded corpus, both (batch_size, seq_len) int64."""
    from common.data import get_batch, load_corpus

    return get_batch(load_corpus(max_tokens=20_000), batch_size=batch_size, seq_len=seq_len, seed=seed)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> a copy of .grad, for every parameter that has one."""
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def check_all_close(got: dict, expected: dict, *, name: str, inputs: str = "", dtype=None, **tolerance) -> None:
    """check_close for every entry of `expected`; a key missing from `got` (or holding None) is a failure too."""
    if not isinstance(got, dict):
        raise AssertionError(f"{name}: expected a dict of tensors, got {type(got).__name__}")
    missing = sorted(key for key in expected if got.get(key) is None)
    if missing:
        raise AssertionError(f"{name}: no value for {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                             + (f" on input {inputs}" if inputs else ""))
    extra = sorted(key for key in got if key not in expected and got[key] is not None)
    if extra:
        raise AssertionError(f"{name}: unexpected values for {extra[:5]} (they should be None)"
                             + (f" on input {inputs}" if inputs else ""))
    for key, want in expected.items():
        check_close(got[key], want, name=f"{name} [{key}]", inputs=inputs, dtype=dtype, **tolerance)
