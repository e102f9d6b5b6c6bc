"""Lab 01, part 4: gradient accumulation equal to the large batch (accumulation.py)."""

import pytest
import torch

from common.testing import check_all_close, check_close, corpus_batch, describe, gradients, tiny_model

IGNORE_INDEX = -100


def uneven_targets(targets: torch.Tensor, *, step: int = 5) -> torch.Tensor:
    """Pad (IGNORE_INDEX) different amounts of each row, so micro-batches hold different token counts."""
    targets = targets.clone()
    for row in range(targets.shape[0]):
        keep = max(1, targets.shape[1] - step * row)
        targets[row, keep:] = IGNORE_INDEX
    return targets


def case_batch(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, targets = corpus_batch(batch_size=case["batch_size"], seq_len=case["seq_len"], seed=case["seed"])
    if case.get("uneven"):
        targets = uneven_targets(targets)
    for row in case.get("padded_rows", ()):
        targets[row] = IGNORE_INDEX
    return tokens, targets


# -----------------------------------------------------------------------------
# Producers: run in the worker


def accumulated(case: dict, num_microbatches: int, *, calls: int = 1, model_seed: int = 0, num_layers: int = 2) -> dict:
    """The loss accumulate_gradients returns, and the .grad it leaves, after `calls` calls on a fresh model."""
    from lab01_memory.accumulation import accumulate_gradients

    model = tiny_model(num_layers=num_layers, seed=model_seed)
    tokens, targets = case_batch(case)
    before = (tokens.clone(), targets.clone())
    losses = [accumulate_gradients(model, tokens, targets, num_microbatches=num_microbatches) for _ in range(calls)]
    return {"losses": [torch.as_tensor(loss).detach() for loss in losses], "grads": gradients(model),
            "inputs_unchanged": torch.equal(before[0], tokens) and torch.equal(before[1], targets)}


def accumulate_error(batch_size: int, seq_len: int, num_microbatches: int, *, cut_targets: int = 0,
                     all_padding: bool = False, flatten: bool = False) -> None:
    from lab01_memory.accumulation import accumulate_gradients

    model = tiny_model(num_layers=1)
    tokens, targets = corpus_batch(batch_size=batch_size, seq_len=seq_len)
    if cut_targets:
        targets = targets[:, :cut_targets]
    if all_padding:
        targets = torch.full_like(targets, IGNORE_INDEX)
    if flatten:  # equal shapes, but not (B, N)
        tokens, targets = tokens.flatten(), targets.flatten()
    accumulate_gradients(model, tokens, targets, num_microbatches=num_microbatches)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _large_batch(case: dict, *, model_seed: int = 0, num_layers: int = 2) -> dict:
    model = tiny_model(num_layers=num_layers, seed=model_seed)
    tokens, targets = case_batch(case)
    loss = model.loss(tokens, targets)
    loss.backward()
    return {"loss": loss.detach(), "grads": gradients(model)}


def _describe(case: dict, num_microbatches: int) -> str:
    tokens, targets = case_batch(case)
    return describe(tokens=tokens, num_microbatches=num_microbatches,
                    valid_tokens_per_row=(targets != IGNORE_INDEX).sum(1).tolist())


@pytest.mark.points(4)
@pytest.mark.parametrize("num_microbatches", [2, 3, 4, 5])
def test_matches_large_batch_with_uneven_token_counts(student, num_microbatches):
    """Accumulated gradients equal the large-batch gradient when micro-batches hold different numbers of tokens
    (B=5 split into 2, 3, 4 and 5 nearly equal parts: 4 parts are 2, 1, 1, 1 rows)."""
    case = dict(batch_size=5, seq_len=16, seed=3, uneven=True)
    got = student.run(accumulated, case, num_microbatches)
    want = _large_batch(case)
    inputs = _describe(case, num_microbatches)
    check_all_close(got["grads"], want["grads"], name="accumulate_gradients (gradients)", inputs=inputs)
    check_close(got["losses"][0].double(), want["loss"], name="accumulate_gradients (returned loss)", inputs=inputs,
                dtype="float32")
    assert got["inputs_unchanged"], "accumulate_gradients must not modify the tokens or targets it is given"


@pytest.mark.points(1)
@pytest.mark.parametrize("num_microbatches", [1, 4])
def test_returns_the_large_batch_loss(student, num_microbatches):
    case = dict(batch_size=4, seq_len=16, seed=4, uneven=True)
    got = student.run(accumulated, case, num_microbatches)
    want = _large_batch(case)
    loss = got["losses"][0]
    assert loss.dim() == 0, f"accumulate_gradients must return a scalar loss, got shape {tuple(loss.shape)}"
    assert not loss.requires_grad, "accumulate_gradients must return a detached loss"
    check_close(loss.double(), want["loss"], name="accumulate_gradients (returned loss)",
                inputs=_describe(case, num_microbatches), dtype="float32")


@pytest.mark.points(1)
def test_gradients_accumulate_on_top_of_existing(student):
    """Like backward(), accumulation adds to .grad: two calls give twice the gradient, and the same loss twice."""
    case = dict(batch_size=4, seq_len=16, seed=5)
    got = student.run(accumulated, case, 2, calls=2)
    want = _large_batch(case)
    doubled = {name: 2 * g for name, g in want["grads"].items()}
    check_all_close(got["grads"], doubled, name="accumulate_gradients called twice (gradients)",
                    inputs=_describe(case, 2))
    for loss in got["losses"]:
        check_close(loss.double(), want["loss"], name="accumulate_gradients called twice (returned loss)",
                    inputs=_describe(case, 2), dtype="float32")


@pytest.mark.points(1)
def test_microbatch_with_no_valid_tokens(student):
    """A micro-batch that is all padding contributes nothing: gradients and the returned loss (finite, not NaN) are
    still the large batch's."""
    case = dict(batch_size=4, seq_len=12, seed=6, padded_rows=(2, 3))
    got = student.run(accumulated, case, 2)
    want = _large_batch(case)
    inputs = _describe(case, 2)
    check_all_close(got["grads"], want["grads"], name="accumulate_gradients with an all-padding micro-batch",
                    inputs=inputs)
    check_close(got["losses"][0].double(), want["loss"], name="accumulate_gradients with an all-padding micro-batch "
                "(returned loss)", inputs=inputs, dtype="float32")


@pytest.mark.points(2)
def test_every_documented_error(student):
    """Mismatched shapes, tensors that are not (B, N), M < 1, M > B, and a batch with no valid target each raise
    ValueError with the documented message."""
    with pytest.raises(ValueError, match="num_microbatches"):
        student.run(accumulate_error, 2, 8, 3)
    with pytest.raises(ValueError, match="num_microbatches"):
        student.run(accumulate_error, 2, 8, 0)
    with pytest.raises(ValueError, match=r"must both be \(B, N\)"):
        student.run(accumulate_error, 2, 8, 1, cut_targets=4)
    with pytest.raises(ValueError, match=r"must both be \(B, N\)"):
        student.run(accumulate_error, 2, 8, 1, flatten=True)
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        student.run(accumulate_error, 2, 8, 2, all_padding=True)
