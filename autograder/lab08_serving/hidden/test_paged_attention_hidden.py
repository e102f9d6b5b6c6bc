"""Lab 08 hidden tests (paged attention): a wider group, a larger head dim, split-K over MQA."""

import pytest
import torch


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_group_of_four_and_head_dim_64(student):
    """8 query heads on 2 K/V heads, D = 64, blocks of 8, five ragged sequences sharing a prefix block."""
    from autograder.lab08_serving.test_paged_attention import _check, decode_triton

    case = dict(B=5, H=8, H_kv=2, D=64, block_size=8, lens=[1, 8, 9, 30, 17], seed=31, shared_prefix_blocks=1)
    _check(student.run(decode_triton, case), case, "paged_decode_attention (GQA 8/2, D=64)")


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_split_k_with_mqa_and_more_splits_than_tiles(student):
    from autograder.lab08_serving.test_paged_attention import _check, decode_torch, decode_triton

    case = dict(B=2, H=5, H_kv=1, D=16, block_size=6, lens=[50, 3], seed=32)
    _check(student.run(decode_triton, case, num_splits=5), case, "paged_decode_attention (MQA, 5 splits)")
    case64 = dict(case, dtype=torch.float64)
    _check(student.run(decode_torch, case64), case64, "paged_attention_torch (MQA 5/1)")
