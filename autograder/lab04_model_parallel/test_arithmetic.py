"""Lab 04, part 8: the arithmetic of model parallelism (arithmetic.py).

The formulas are checked against the same formulas written out here, on many configurations, and against what the
ranks really hold and send: parameters counted on the modules, bytes counted through a wrapper on every collective
and every batch_isend_irecv (workers.CollectiveLog) during a tp 2 step (with and without sequence parallelism) and a
tp 2 x pp 2 pipeline step.
"""

import math

import pytest

from autograder.lab04_model_parallel.workers import arithmetic_counts, formulas
from common.model import ModelConfig

CONFIGS = [
    {"num_layers": 4, "width": 64, "num_heads": 4, "num_kv_heads": 2},
    {"num_layers": 5, "width": 96, "num_heads": 8, "num_kv_heads": 1, "vocab_size": 512, "ffn_width": 256},
    {"num_layers": 3, "width": 128, "num_heads": 8, "num_kv_heads": 8, "tie_embeddings": True},
    {"num_layers": 12, "width": 768, "num_heads": 12, "num_kv_heads": 12, "vocab_size": 50304, "ffn_width": 2048,
     "tie_embeddings": True},
]


def _parameters(config: ModelConfig, tp: int, pp: int, stage: int) -> int:
    C, V, F = config.width, config.vocab_size, config.hidden_width
    kv_rows = (config.num_kv_heads // tp if config.num_kv_heads % tp == 0 else 1) * config.head_dim
    block = 2 * C + 2 * (C * C // tp) + 2 * kv_rows * C + 3 * (F * C // tp)
    sizes = [config.num_layers // pp + (s < config.num_layers % pp) for s in range(pp)]
    total = sizes[stage] * block
    total += (V * C // tp) if stage == 0 else 0
    total += (C + (0 if config.tie_embeddings else V * C // tp)) if stage == pp - 1 else 0
    return total


def _korthikanti(config: ModelConfig, b: int, s: int, tp: int, sp: bool) -> float:
    h, a = config.width, config.num_heads
    if sp:
        return s * b * h / tp * (34 + 5 * a * s / h)
    return (10 + 24 / tp + 5 * a * s / (h * tp)) * s * b * h


def _tp_traffic(config: ModelConfig, B: int, N: int, tp: int, nbytes: int, sp: bool) -> dict:
    L, C = config.num_layers, config.width
    act = B * N * C * nbytes
    extra = 3 * B * N * max(nbytes, 4)
    if config.num_kv_heads < tp:
        extra += 2 * L * config.num_kv_heads * config.head_dim * C * nbytes
    if sp:
        return {"all_reduce": extra + (2 * L + 1) * C * nbytes, "all_gather": (4 * L + 2) * act,
                "reduce_scatter": (4 * L + 2) * act}
    return {"all_reduce": extra + (4 * L + 2) * act, "all_gather": 0, "reduce_scatter": 0}


@pytest.mark.points(2)
def test_parameters_per_rank(student):
    """parameters_per_rank for tp in {1, 2, 4}, pp in {1, 2, 3} and every stage, on GQA, MQA (K/V copies), tied and
    GPT-2-sized models, against the formula; a stage outside [0, pp) raises ValueError."""
    cases, keys = [], []
    for config in CONFIGS:
        for tp in (1, 2, 4):
            for pp in (1, 2, 3):
                if config.get("tie_embeddings") and pp > 1:
                    continue
                for stage in range(pp):
                    cases.append({"fn": "parameters_per_rank", "config": config, "tp": tp, "pp": pp, "stage": stage})
                    keys.append((config, tp, pp, stage))
    got = student.run(formulas, cases + [{"fn": "parameters_per_rank", "config": CONFIGS[0], "pp": 2, "stage": 2}])
    for (config, tp, pp, stage), value in zip(keys, got):
        want = _parameters(ModelConfig(**config), tp, pp, stage)
        assert type(value) is int and value == want, (
            f"parameters_per_rank({config}, tp={tp}, pp={pp}, stage={stage}) = {value!r}, expected the int {want}")
    assert isinstance(got[-1], str) and got[-1].startswith("ValueError"), (
        f"parameters_per_rank(stage=2, pp=2) should raise ValueError, got {got[-1]}")


@pytest.mark.points(2)
def test_activation_memory(student):
    """layer_activation_bytes is Korthikanti et al.'s Eqs. 1-4 (with and without sequence parallelism);
    activation_bytes_per_rank multiplies it by the stage's blocks and its peak micro-batches in flight (m under
    GPipe, min(p - s, m) under 1F1B)."""
    cases, keys = [], []
    for config in CONFIGS[:2]:
        for tp, sp in ((1, False), (2, False), (4, True), (2, True)):
            cases.append({"fn": "layer_activation_bytes", "config": config, "micro_batch_size": 3, "seq_len": 40,
                          "tp": tp, "sequence_parallel": sp})
            keys.append(("layer", config, tp, sp, None, None, None, None))
            for pp, m, schedule in ((2, 8, "1f1b"), (2, 8, "gpipe"), (3, 2, "1f1b"), (4, 6, "1f1b")):
                if pp > config["num_layers"]:
                    continue
                for stage in range(pp):
                    cases.append({"fn": "activation_bytes_per_rank", "config": config, "micro_batch_size": 3,
                                  "seq_len": 40, "num_microbatches": m, "tp": tp, "pp": pp, "stage": stage,
                                  "schedule": schedule, "sequence_parallel": sp})
                    keys.append(("rank", config, tp, sp, pp, m, schedule, stage))
    got = student.run(formulas, cases)
    for (kind, config, tp, sp, pp, m, schedule, stage), value in zip(keys, got):
        model = ModelConfig(**config)
        per_layer = _korthikanti(model, 3, 40, tp, sp)
        if kind == "layer":
            want = per_layer
        else:
            layers = model.num_layers // pp + (stage < model.num_layers % pp)
            in_flight = m if schedule == "gpipe" else min(pp - stage, m)
            want = in_flight * layers * per_layer
        assert isinstance(value, (int, float)) and math.isclose(value, want, rel_tol=1e-9), (
            f"{cases[keys.index((kind, config, tp, sp, pp, m, schedule, stage))]}: got {value}, expected {want}")


@pytest.mark.points(2)
def test_communication_formulas(student):
    """tp_communication_bytes (all-reduce, or all-gather and reduce-scatter with sequence parallelism, the loss's
    3 T numbers, K/V copies, the norms) and pp_communication_bytes (independent of m) against the formulas."""
    cases, keys = [], []
    for config in CONFIGS:
        for tp in (2, 4):
            for sp in (False, True):
                for nbytes in (2, 4):
                    cases.append({"fn": "tp_communication_bytes", "config": config, "batch_size": 3, "seq_len": 16,
                                  "tp": tp, "dtype_bytes": nbytes, "sequence_parallel": sp})
                    keys.append(("tp", config, tp, sp, nbytes, None))
        for pp in (1, 2, 3):
            for stage in range(pp):
                cases.append({"fn": "pp_communication_bytes", "config": config, "batch_size": 3, "seq_len": 16,
                              "num_stages": pp, "stage": stage, "dtype_bytes": 2})
                keys.append(("pp", config, None, None, pp, stage))
    got = student.run(formulas, cases)
    for (kind, config, tp, sp, a, b), value in zip(keys, got):
        model = ModelConfig(**config)
        if kind == "tp":
            want = _tp_traffic(model, 3, 16, tp, a, sp)
        else:
            act = 3 * 16 * model.width * 2
            each = act * (b < a - 1) + act * (b > 0)
            want = {"send": each, "recv": each}
        assert value == want and all(type(v) is int for v in value.values()), (
            f"{cases[keys.index((kind, config, tp, sp, a, b))]}: got {value!r}, expected the ints {want}")


@pytest.mark.points(4)
@pytest.mark.time_limit(200)
def test_formulas_match_counted_bytes(student):
    """World 4: the bytes counted on every collective of a tp 2 step (MQA: K/V copies), with and without sequence
    parallelism, and on every batch_isend_irecv of a tp 2 x pp 2 pipeline step equal the formulas' predictions; the
    parameters each rank holds equal parameters_per_rank."""
    got = student.run(arithmetic_counts, 61)
    config = ModelConfig.preset("tiny", num_layers=3, num_kv_heads=1, max_seq_len=32)
    for rank, out in enumerate(got):
        for sp in (False, True):
            entry = out[f"tp sp={sp}"]
            want = _tp_traffic(config, 4, 8, 2, 8, sp)  # each data-parallel replica runs the whole batch of 4
            counted = {kind: entry["counted"].get(kind, 0) for kind in want}
            counted["all_gather"] += entry["counted"].get("all_gather_into_tensor", 0)
            counted["reduce_scatter"] += entry["counted"].get("reduce_scatter_tensor", 0)
            what = f"rank {rank}, tp 2 step{' with sequence parallelism' if sp else ''}"
            assert entry["predicted"] == want, (
                f"tp_communication_bytes for the counted step ({what}): {entry['predicted']}, expected {want}")
            assert counted == want, f"bytes counted on the collectives ({what}): {counted}, the formula gives {want}"
            assert entry["params"] == _parameters(config, 2, 1, 0), (
                f"{what}: the rank holds {entry['params']} parameters, the formula gives "
                f"{_parameters(config, 2, 1, 0)}")
        entry = out["pp"]
        stage = entry["pp_rank"]
        act = 4 * 8 * 64 * 8
        each = act * (stage == 0) + act * (stage == 1)
        want = {"send": each, "recv": each}
        assert entry["predicted"] == want and entry["counted"] == want, (
            f"rank {rank} (stage {stage} of a tp 2 x pp 2 pipeline): predicted {entry['predicted']}, counted "
            f"{entry['counted']}, expected {want}")
        assert entry["params"] == entry["predicted_params"] == _parameters(config, 2, 2, stage), (
            f"rank {rank} (stage {stage}, tp 2): holds {entry['params']} parameters, parameters_per_rank says "
            f"{entry['predicted_params']}, the formula {_parameters(config, 2, 2, stage)}")
