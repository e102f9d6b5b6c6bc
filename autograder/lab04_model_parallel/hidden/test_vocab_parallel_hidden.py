"""Lab 04 hidden tests (vocabulary parallelism): three ranks."""

import pytest

from autograder.lab04_model_parallel.test_vocab_parallel import _expected
from autograder.lab04_model_parallel.workers import vocab
from common.testing import check_close, describe


@pytest.mark.points(2)
@pytest.mark.time_limit(200)
def test_three_ranks(student):
    """V = 24 over 3 ranks: embedding, per-token losses and gradients; 3 T numbers through all-reduces at most."""
    got = student.run(vocab, 3, 17, 24)
    want = _expected(24, 17)
    for r, out in enumerate(got):
        where = describe(world_size=3, rank=r, vocab_size=24)
        check_close(out["embed"]["y"], want["embed"]["y"], name="VocabParallelEmbedding at t = 3", inputs=where)
        for name in ("fp64", "fp32 far from zero"):
            check_close(out[name]["losses"], want[name]["losses"], name=f"vocab_parallel_cross_entropy ({name})",
                        inputs=where, dtype=want[name]["dtype"])
            check_close(out[name]["dlogits"], want[name]["dlogits"][:, 8 * r:8 * r + 8],
                        name=f"vocab_parallel_cross_entropy gradient ({name})", inputs=where,
                        dtype=want[name]["dtype"])
            assert all(call[0] == "all_reduce" for call in out[name]["calls"]), out[name]["calls"]
