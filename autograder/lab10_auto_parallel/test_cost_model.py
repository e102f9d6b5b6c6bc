"""Lab 10, part 2: the cost model of a training step (cost_model.py): FLOPs, then each parallelism's communication
and the pipeline bubble, against the formulas written out in formulas.py, on clusters the tests define in full."""

import math

import pytest

from autograder.lab10_auto_parallel.formulas import TWO_LEVEL, forward_flops, head, step
from autograder.lab10_auto_parallel.workers import call
from common.model import ModelConfig

GQA = {"num_layers": 6, "width": 96, "num_heads": 6, "num_kv_heads": 2, "vocab_size": 320, "ffn_width": 208,
       "max_seq_len": 256}
MHA = {"num_layers": 8, "width": 256, "num_heads": 8, "num_kv_heads": 8, "vocab_size": 1024, "max_seq_len": 512}
WORKLOAD = {"global_batch": 48, "seq_len": 96, "param_bytes": 2, "grad_bytes": 4, "optimizer_bytes": 12,
            "activation_bytes": 2}


def _step_cases(config, plans, workload=WORKLOAD, cluster=TWO_LEVEL):
    return [{"module": "cost_model", "fn": "step_time", "args": [("config", config), ("plan", plan)],
             "kwargs": {"workload": workload, "cluster": cluster}} for plan in plans]


def _check_step(got, config, plans, workload=WORKLOAD, cluster=TWO_LEVEL, parts=("total",)):
    for plan, value in zip(plans, got):
        want = step(ModelConfig(**config), plan, workload, cluster)
        assert isinstance(value, dict), f"step_time({plan}) returned {value!r}"
        for part in parts:
            assert math.isclose(value[part], want[part], rel_tol=1e-9, abs_tol=1e-15), (
                f"step_time(plan={plan}, workload={workload}).{part} = {value[part]:.6g} s, expected "
                f"{want[part]:.6g} s (all parts expected: {want})")


@pytest.mark.points(3)
def test_flops(student):
    """layer_flops (six GEMMs with GQA K/V widths + 4 b s^2 C), head_flops (2 T C V) and model_flops_per_step
    (3 x the forward) on two models and odd batch and sequence sizes."""
    keys = [(GQA, 3, 17), (MHA, 1, 96), (GQA, 5, 1)]
    cases = []
    for config, b, s in keys:
        cases += [{"module": "cost_model", "fn": fn, "args": [("config", config)],
                   "kwargs": {"batch_size": b, "seq_len": s}} for fn in ("layer_flops", "head_flops")]
        cases.append({"module": "cost_model", "fn": "model_flops_per_step", "args": [("config", config)],
                      "kwargs": {"global_batch": b, "seq_len": s}})
    got = student.run(call, cases)
    for index, (config, b, s) in enumerate(keys):
        model = ModelConfig(**config)
        layer, out = forward_flops(model, b, s), head(model, b, s)
        wants = [layer, out, 3 * (model.num_layers * layer + out)]
        for name, value, want in zip(("layer_flops", "head_flops", "model_flops_per_step"), got[3 * index:], wants):
            assert isinstance(value, float | int) and math.isclose(value, want, rel_tol=1e-12), (
                f"{name}({config}, batch {b}, seq {s}) = {value!r}, expected {want:.8g}")


@pytest.mark.points(3)
def test_data_parallel_and_zero(student):
    """Pure data parallelism over 2 nodes: all-reduce of the gradients (ZeRO 0), reduce-scatter + all-gather (ZeRO 1
    and 2), and per micro-batch two all-gathers and a reduce-scatter (ZeRO 3); compute split by dp."""
    plans = [{"dp": 8, "zero_stage": z, "num_microbatches": m} for z in (0, 1, 2, 3) for m in (1, 3)]
    plans.append({"dp": 1})
    got = student.run(call, _step_cases(GQA, plans))
    _check_step(got, GQA, plans, parts=("compute", "dp_comm", "tp_comm", "pp_comm", "total"))


@pytest.mark.points(3)
def test_tensor_parallel_and_checkpointing(student):
    """Tensor parallelism: 4 all-reduces of the micro-batch's activations per block (6 with checkpointing, whose
    compute is 4 x the forward instead of 3 x), inside a node and across nodes (tp 8 on 4-device nodes)."""
    plans = [{"tp": 2}, {"tp": 4, "checkpointing": True}, {"tp": 8}, {"tp": 2, "dp": 2, "checkpointing": True},
             {"tp": 4, "dp": 4, "num_microbatches": 2, "zero_stage": 1}]
    got = student.run(call, _step_cases(MHA, plans))
    _check_step(got, MHA, plans, parts=("compute", "tp_comm", "dp_comm", "total"))


@pytest.mark.points(3)
def test_pipeline(student):
    """Pipelines: (m + p - 1) slots of the slowest stage, so the bubble is (p-1)/(m+p-1) of the pipeline's time;
    uneven stages (6 blocks over 4 stages), the output layer on the last stage, P2P inside and across nodes."""
    plans = [{"pp": 2, "num_microbatches": 8}, {"pp": 3, "num_microbatches": 1}, {"pp": 6, "num_microbatches": 4},
             {"pp": 2, "tp": 2, "num_microbatches": 6, "checkpointing": True}, {"pp": 2, "tp": 2, "dp": 4,
                                                                                "num_microbatches": 3},
             {"pp": 4, "num_microbatches": 12}]
    got = student.run(call, _step_cases(GQA, plans))
    _check_step(got, GQA, plans, parts=("compute", "pp_comm", "tp_comm", "bubble", "total"))
    for plan, value in zip(plans, got):
        p, m = plan["pp"], plan["num_microbatches"]
        pipeline = value["total"] - value["dp_comm"]
        assert math.isclose(value["bubble"] / pipeline, (p - 1) / (m + p - 1), rel_tol=1e-9), (
            f"step_time({plan}): bubble / pipeline time = {value['bubble'] / pipeline:.6f}, expected "
            f"(p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.6f}")


@pytest.mark.points(2)
def test_errors(student):
    """ParallelPlan refuses sizes < 1 and a ZeRO stage outside 0-3; step_time refuses dp x m not dividing the
    global batch and more stages than blocks; Workload refuses an empty batch."""
    cases = [
        {"module": "cost_model", "fn": "ParallelPlan", "kwargs": {"dp": 0}},
        {"module": "cost_model", "fn": "ParallelPlan", "kwargs": {"num_microbatches": 0}},
        {"module": "cost_model", "fn": "ParallelPlan", "kwargs": {"zero_stage": 4}},
        {"module": "cost_model", "fn": "Workload", "kwargs": {"global_batch": 0, "seq_len": 8}},
        *_step_cases(GQA, [{"dp": 5}, {"dp": 2, "num_microbatches": 5}, {"pp": 7}]),
    ]
    got = student.run(call, cases)
    words = ["dp", "num_microbatches", "zero_stage", "global_batch", "divisible", "divisible", "num_layers"]
    for case, value, word in zip(cases, got, words):
        assert isinstance(value, str) and value.startswith("ValueError") and word in value, (
            f"{case['fn']}({case.get('kwargs', case.get('args'))}) should raise ValueError mentioning {word!r}, "
            f"got {value!r}")
