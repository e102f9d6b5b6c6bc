"""Lab 01 hidden tests (selective recomputation): other head layouts and widths."""

import pytest

from common.testing import check_all_close, describe


@pytest.mark.points(2)
@pytest.mark.parametrize("overrides", [dict(num_kv_heads=1), dict(num_kv_heads=4, ffn_width=40)])
def test_mqa_and_mha_with_a_narrow_mlp(student, overrides):
    """MQA (one K/V head) and MHA with an FFN width of 40: gradients still equal the plain model's."""
    from autograder.lab01_memory.test_selective import _plain, selective_run

    case = dict(num_layers=2, dropout=0.1, batch=dict(batch_size=3, seq_len=9, seed=7), rng_seed=3,
                overrides=overrides)
    got = student.run(selective_run, {}, **case)
    want = _plain(**case)
    check_all_close(got["grads"], want["grads"], name="selective recomputation: gradients",
                    inputs=describe(model=overrides, tokens=(3, 9)))
