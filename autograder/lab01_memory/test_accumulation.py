"""Lab 01, part 4: gradient accumulation equal to the large batch (accumulation.py)."""

import pytest
import torch

from common.testing import check_close, describe


def _uneven_targets(targets: torch.Tensor) -> torch.Tensor:
    """Pad (IGNORE_INDEX) different amounts of each row, so micro-batches hold different token counts."""
    targets = targets.clone()
    for row in range(targets.shape[0]):
        keep = max(1, targets.shape[1] - 5 * row)
        targets[row, keep:] = -100
    return targets


@pytest.mark.points(4)
@pytest.mark.parametrize("num_microbatches", [2, 3, 5])
def test_matches_large_batch_with_uneven_token_counts(num_microbatches, make_model, make_batch, grads):
    """Accumulated gradients equal the large-batch gradient when micro-batches hold different numbers of tokens."""
    from lab01_memory.accumulation import accumulate_gradients

    model = make_model(num_layers=2)
    tokens, targets = make_batch(batch_size=5, seq_len=16, seed=3)
    targets = _uneven_targets(targets)
    model.loss(tokens, targets).backward()
    expected = grads(model)
    model.zero_grad()
    accumulate_gradients(model, tokens, targets, num_microbatches=num_microbatches)
    got = grads(model)
    inputs = describe(tokens=tokens, num_microbatches=num_microbatches,
                      valid_tokens_per_row=(targets != -100).sum(1).tolist())
    for name in expected:
        if name not in got:
            raise AssertionError(f"accumulate_gradients left no gradient on {name} ({inputs})")
        check_close(got[name], expected[name], name=f"accumulate_gradients (gradient of {name})", inputs=inputs)


@pytest.mark.points(1)
def test_returns_the_large_batch_loss(make_model, make_batch):
    from lab01_memory.accumulation import accumulate_gradients

    model = make_model(num_layers=2)
    tokens, targets = make_batch(batch_size=4, seq_len=16, seed=4)
    targets = _uneven_targets(targets)
    expected = model.loss(tokens, targets).detach()
    got = accumulate_gradients(model, tokens, targets, num_microbatches=4)
    check_close(torch.as_tensor(got, dtype=torch.float64), expected, name="accumulate_gradients (returned loss)",
                inputs=describe(tokens=tokens, num_microbatches=4), dtype="float32")


@pytest.mark.points(1)
def test_gradients_accumulate_on_top_of_existing(make_model, make_batch, grads):
    """Like backward(), accumulation adds to .grad: two calls give twice the gradient."""
    from lab01_memory.accumulation import accumulate_gradients

    model = make_model(num_layers=2)
    tokens, targets = make_batch(batch_size=4, seq_len=16, seed=5)
    accumulate_gradients(model, tokens, targets, num_microbatches=2)
    once = grads(model)
    accumulate_gradients(model, tokens, targets, num_microbatches=2)
    twice = grads(model)
    for name in once:
        check_close(twice[name], 2 * once[name], name=f"accumulate_gradients called twice ({name})",
                    inputs=describe(tokens=tokens))


@pytest.mark.points(1)
def test_bad_input_is_rejected(make_model, make_batch):
    from lab01_memory.accumulation import accumulate_gradients

    model = make_model(num_layers=1)
    tokens, targets = make_batch(batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="num_microbatches"):
        accumulate_gradients(model, tokens, targets, num_microbatches=3)
    with pytest.raises(ValueError, match="targets"):
        accumulate_gradients(model, tokens, targets[:, :4], num_microbatches=1)
