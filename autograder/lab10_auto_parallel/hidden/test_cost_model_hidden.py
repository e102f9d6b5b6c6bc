"""Lab 10 hidden tests (cost model): a GPT-2-sized model, tied embeddings, uneven stages with tp, dp and ZeRO."""

import math

import pytest

from autograder.lab10_auto_parallel.formulas import step
from autograder.lab10_auto_parallel.workers import call
from common.model import ModelConfig

GPT2 = {"vocab_size": 50304, "num_layers": 7, "width": 768, "num_heads": 12, "num_kv_heads": 4, "ffn_width": 2048,
        "max_seq_len": 1024}
CLUSTER = {"name": "h200-nvlink-ib", "gpus_per_node": 8, "num_nodes": 16, "peak_flops": 9.9e14,
           "achievable_fraction": 0.45, "memory_bytes": 1.4e11, "layer_overhead_s": 3e-5,
           "intra": {"alpha": 4e-6, "bandwidth": 4.5e11}, "inter": {"alpha": 9e-6, "bandwidth": 5e10}}
WORKLOAD = {"global_batch": 96, "seq_len": 1024, "param_bytes": 2, "grad_bytes": 2, "optimizer_bytes": 12,
            "activation_bytes": 2}


@pytest.mark.points(2)
def test_gpt2_plans(student):
    """7 blocks over 2, 3 and 7 stages, tp 2 and 4, dp up to 16 (two nodes), ZeRO 1 and 3, checkpointing."""
    plans = [{"pp": 3, "tp": 4, "dp": 8, "num_microbatches": 4, "zero_stage": 1},
             {"pp": 7, "dp": 2, "num_microbatches": 12, "checkpointing": True},
             {"dp": 16, "tp": 2, "zero_stage": 3, "num_microbatches": 2},
             {"pp": 2, "tp": 2, "dp": 4, "num_microbatches": 3, "checkpointing": True, "zero_stage": 1}]
    got = student.run(call, [{"module": "cost_model", "fn": "step_time", "args": [("config", GPT2), ("plan", p)],
                              "kwargs": {"workload": WORKLOAD, "cluster": CLUSTER}} for p in plans])
    for plan, value in zip(plans, got):
        want = step(ModelConfig(**GPT2), plan, WORKLOAD, CLUSTER)
        for part, expected in want.items():
            assert math.isclose(value[part], expected, rel_tol=1e-9, abs_tol=1e-15), (
                f"step_time({plan}).{part} = {value[part]}, expected {expected}")
