"""Lab 01 hidden tests (checkpoint): the same ideas on inputs the public tests do not show."""

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(2)
def test_checkpoint_with_tuple_output(student):
    """A checkpointed function may return a tuple; gradients flow through every element."""
    from autograder.lab01_memory.hidden.producers import tuple_output_gradients

    got = student.run(tuple_output_gradients, 0, True)
    want = tuple_output_gradients(0, False)
    for key in ("dx", "dw", "db"):
        check_close(got[key], want[key], name=f"checkpoint with a tuple output ({key})", inputs=describe(x=(3, 7)))


@pytest.mark.points(1)
def test_checkpointed_model_under_no_grad(student):
    """Evaluation under torch.no_grad through a checkpointed model works and gives the plain logits."""
    from autograder.lab01_memory.hidden.producers import model_under_no_grad

    got = student.run(model_under_no_grad, dict(plan="every_k", k=2))
    check_close(got["planned"], got["plain"], name="apply_checkpointing under no_grad (logits)",
                inputs=describe(tokens=(2, 10)))
