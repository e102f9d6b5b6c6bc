"""Lab 01 hidden tests (accumulation): the same ideas on inputs the public tests do not show."""

import pytest

from common.testing import check_all_close, check_close


@pytest.mark.points(1)
def test_every_row_its_own_microbatch_with_padding_first(student):
    """M = B with the first rows all padding and a deeper model: still the large batch's gradient and loss."""
    from autograder.lab01_memory.test_accumulation import _describe, _large_batch, accumulated

    case = dict(batch_size=6, seq_len=9, seed=11, padded_rows=(0, 1), uneven=True)
    got = student.run(accumulated, case, 6, model_seed=3, num_layers=3)
    want = _large_batch(case, model_seed=3, num_layers=3)
    check_all_close(got["grads"], want["grads"], name="accumulate_gradients, M=B=6 (gradients)",
                    inputs=_describe(case, 6))
    check_close(got["losses"][0].double(), want["loss"], name="accumulate_gradients, M=B=6 (loss)",
                inputs=_describe(case, 6), dtype="float32")
