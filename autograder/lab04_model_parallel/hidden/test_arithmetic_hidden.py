"""Lab 04 hidden tests (arithmetic): a larger model, 16-bit."""

import pytest

from autograder.lab04_model_parallel.test_arithmetic import _parameters, _tp_traffic
from autograder.lab04_model_parallel.workers import formulas
from common.model import ModelConfig

GPT2 = {"num_layers": 12, "width": 1024, "num_heads": 16, "num_kv_heads": 4, "vocab_size": 50304, "ffn_width": 2048,
        "max_seq_len": 1024}


@pytest.mark.points(1)
def test_larger_model(student):
    """A 16-head model with 4 K/V heads at tp 8 (copies) and pp 4: parameters and traffic."""
    cases = [{"fn": "parameters_per_rank", "config": GPT2, "tp": 8, "pp": 4, "stage": s} for s in range(4)]
    cases.append({"fn": "tp_communication_bytes", "config": GPT2, "batch_size": 8, "seq_len": 1024, "tp": 8,
                  "dtype_bytes": 2})
    got = student.run(formulas, cases)
    config = ModelConfig(**GPT2)
    assert got[:4] == [_parameters(config, 8, 4, s) for s in range(4)], got[:4]
    assert got[4] == _tp_traffic(config, 8, 1024, 8, 2, False), got[4]
