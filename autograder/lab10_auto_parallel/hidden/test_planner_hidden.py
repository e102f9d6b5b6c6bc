"""Lab 10 hidden tests (planner): tied embeddings refuse pipelines; a Megatron-LM configuration's pick fits."""

import pytest

from autograder.lab10_auto_parallel.formulas import TWO_LEVEL
from autograder.lab10_auto_parallel.workers import plan_result

TIED = {"num_layers": 4, "width": 128, "num_heads": 4, "num_kv_heads": 4, "vocab_size": 512, "max_seq_len": 256,
        "tie_embeddings": True}


@pytest.mark.points(1)
def test_tied_embeddings(student):
    """Every pp > 1 shape is refused with a reason naming the tied embeddings; the best has pp 1."""
    got = student.run(plan_result, TIED, TWO_LEVEL, {"global_batch": 8, "seq_len": 256}, None, 4)
    assert got["best"]["pp"] == 1, got["best"]
    refused = [r for r in got["rejected"] if r["plan"]["pp"] > 1]
    assert refused and all("tie" in r["reason"] for r in refused), refused[:3]


@pytest.mark.points(1)
def test_gpt_on_a100(student):
    """Megatron-LM's 18.4 B model on 256 A100s (batch 1024): the pick fits in 80 GB, keeps tp inside a node."""
    config = {"vocab_size": 51200, "max_seq_len": 2048, "num_layers": 40, "num_heads": 48, "num_kv_heads": 48,
              "width": 6144}
    got = student.run(plan_result, config, {"name": "a100-80gb-selene"}, {"global_batch": 1024, "seq_len": 2048},
                      None, 256)
    assert got["memory"]["total"] <= 80e9 and got["best"]["tp"] <= 8, got["best"]
