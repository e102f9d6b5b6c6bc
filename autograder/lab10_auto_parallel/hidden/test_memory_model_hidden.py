"""Lab 10 hidden tests (memory): tied embeddings, MHA, ZeRO 3 with checkpointing and accumulation."""

import math

import pytest

from autograder.lab10_auto_parallel.formulas import memory
from autograder.lab10_auto_parallel.workers import call
from common.model import ModelConfig

TIED = {"num_layers": 5, "width": 160, "num_heads": 10, "num_kv_heads": 10, "vocab_size": 640, "max_seq_len": 128,
        "tie_embeddings": True}
WORKLOAD = {"global_batch": 30, "seq_len": 33, "param_bytes": 4, "grad_bytes": 4, "optimizer_bytes": 8,
            "activation_bytes": 4}


@pytest.mark.points(1)
def test_tied_mha(student):
    """A tied-embedding MHA model at dp 5 x tp 2 (ZeRO 3, checkpointing, m 3) and dp 3 x tp 2 x pp 5 (ZeRO 1)."""
    plans = [{"dp": 5, "tp": 2, "zero_stage": 3, "checkpointing": True, "num_microbatches": 3},
             {"dp": 3, "tp": 2, "pp": 5, "zero_stage": 1, "num_microbatches": 2}]
    got = student.run(call, [{"module": "memory_model", "fn": "memory_per_device", "args": [("config", TIED),
                                                                                          ("plan", p)],
                              "kwargs": {"workload": WORKLOAD}} for p in plans])
    for plan, value in zip(plans, got):
        want = memory(ModelConfig(**TIED), plan, WORKLOAD)
        for part, expected in want.items():
            assert math.isclose(value[part], expected, rel_tol=1e-9), f"memory({plan}).{part} = {value[part]}"
