"""Lab 10, part 3: memory per device (memory_model.py): model states under each ZeRO stage and activations with and
without checkpointing against the formulas, then against the bytes ranks really hold (world 4, fp32) and the bytes
autograd really saves (one process), within 10%."""

import math

import pytest

from autograder.lab10_auto_parallel.formulas import block_bytes, memory
from autograder.lab10_auto_parallel.workers import activations_counted, call, memory_states
from common.model import ModelConfig

GQA = {"num_layers": 6, "width": 96, "num_heads": 6, "num_kv_heads": 2, "vocab_size": 320, "ffn_width": 208,
       "max_seq_len": 256}
MQA = {"num_layers": 4, "width": 128, "num_heads": 8, "num_kv_heads": 1, "vocab_size": 512, "max_seq_len": 256}
WORKLOAD = {"global_batch": 24, "seq_len": 40, "param_bytes": 2, "grad_bytes": 4, "optimizer_bytes": 12,
            "activation_bytes": 2}


def _memory_cases(config, plans):
    return [{"module": "memory_model", "fn": "memory_per_device", "args": [("config", config), ("plan", plan)],
             "kwargs": {"workload": WORKLOAD}} for plan in plans]


def _check(got, config, plans, parts):
    for plan, value in zip(plans, got):
        want = memory(ModelConfig(**config), plan, WORKLOAD)
        assert isinstance(value, dict), f"memory_per_device({plan}) returned {value!r}"
        for part in parts:
            assert math.isclose(value[part], want[part], rel_tol=1e-9), (
                f"memory_per_device({config}, plan={plan}).{part} = {value[part]:.8g} bytes, expected "
                f"{want[part]:.8g} (all parts expected: {want})")


@pytest.mark.points(3)
def test_model_states(student):
    """Parameters, gradients and optimizer state of the fullest device: Ψ from tp and pp (K/V copies with MQA),
    divided by dp for the optimizer (ZeRO 1), and the gradients (2) and parameters (3)."""
    plans = [{"dp": 4, "zero_stage": z} for z in range(4)] + [{"tp": 2, "pp": 2, "dp": 3, "zero_stage": 1},
                                                              {"tp": 4, "pp": 3, "zero_stage": 0}]
    got = student.run(call, _memory_cases(MQA, plans[:4] + plans[5:]) + _memory_cases(GQA, plans[4:5]))
    _check(got[:5], MQA, plans[:4] + plans[5:], ("params", "grads", "optimizer"))
    _check(got[5:], GQA, plans[4:5], ("params", "grads", "optimizer"))


@pytest.mark.points(3)
def test_activations(student):
    """Activations: a_block per micro-batch and block (split by tp), min(p - s, m) micro-batches in flight under
    1F1B on stage s, only block inputs (+ one block rebuilt) with checkpointing, the output layer on the last stage."""
    plans = [{}, {"checkpointing": True}, {"tp": 2, "num_microbatches": 3}, {"pp": 3, "num_microbatches": 4},
             {"pp": 2, "num_microbatches": 1, "checkpointing": True}, {"pp": 6, "num_microbatches": 8, "tp": 2},
             {"pp": 3, "num_microbatches": 2, "dp": 2, "checkpointing": True}]
    got = student.run(call, _memory_cases(GQA, plans) + [
        {"module": "memory_model", "fn": "block_activation_bytes", "args": [("config", MQA)],
         "kwargs": {"micro_batch_size": 3, "seq_len": 11, "tp": tp, "activation_bytes": 4}} for tp in (1, 2, 8)])
    _check(got[:len(plans)], GQA, plans, ("activations", "total"))
    for tp, value in zip((1, 2, 8), got[len(plans):]):
        want = block_bytes(ModelConfig(**MQA), 3, 11, tp, 4)
        assert isinstance(value, float | int) and math.isclose(value, want, rel_tol=1e-9), (
            f"block_activation_bytes(MQA 8 heads / 1 K/V head, b 3, s 11, tp {tp}, 4 bytes) = {value!r}, "
            f"expected {want:.8g}")


@pytest.mark.points(3)
def test_states_counted(student):
    """At world 4 (fp32: 4-byte parameters and gradients, 8 bytes of Adam state), the bytes each rank holds after a
    step under ZeRO 0-3, tp 2 x dp 2 and pp 2 x dp 2, within 10% of memory_per_device's prediction (ZeRO pads)."""
    plans = [{"dp": 4}, {"dp": 4, "zero_stage": 1}, {"dp": 4, "zero_stage": 2}, {"dp": 4, "zero_stage": 3},
             {"dp": 2, "tp": 2, "zero_stage": 2}, {"dp": 2, "pp": 2, "num_microbatches": 2}]
    got = student.run(memory_states, plans, world_size=4, num_layers=4, batch_size=8, seq_len=16)
    for plan, ranks in zip(plans, zip(*got)):
        for part in ("params", "grads", "optimizer"):
            counted = max(rank["counted"][part] for rank in ranks)
            predicted = ranks[0]["predicted"][part]
            assert counted > 0 and abs(predicted - counted) <= 0.1 * counted, (
                f"plan {plan}: memory_per_device predicts {predicted:.0f} bytes of {part}, the fullest rank holds "
                f"{counted:.0f} (more than 10% apart)")


@pytest.mark.points(3)
def test_activations_counted(student):
    """The bytes autograd saves in one forward of the loss (one process, fp32), with and without checkpointing
    (plus one block's own, rebuilt in backward), within 10% of activation_memory; GQA and MQA models."""
    cases = [{"config": {"num_layers": 3, "width": 64, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 64},
              "batch_size": 3, "seq_len": 24, "checkpointing": ckpt} for ckpt in (False, True)]
    cases.append({"config": {"num_layers": 2, "width": 96, "num_heads": 6, "num_kv_heads": 1, "max_seq_len": 64,
                             "vocab_size": 200, "ffn_width": 144}, "batch_size": 2, "seq_len": 40,
                  "checkpointing": False})
    got = student.run(activations_counted, cases)
    for case, value in zip(cases, got):
        counted = value["forward"] + (value["block"] if case["checkpointing"] else 0)
        assert abs(value["predicted"] - counted) <= 0.1 * counted, (
            f"activation_memory for {case}: predicted {value['predicted']:.0f} bytes, counted {counted:.0f}")
