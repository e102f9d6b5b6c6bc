"""Lab 10, part 6: the planner (planner.py): the grid it searches, the best plan against every plan priced here with
the formulas, the ranked table of rejected plans with reasons, and requests it must refuse with a clear reason."""

import math

import pytest

from autograder.lab10_auto_parallel.formulas import TWO_LEVEL, memory, step
from autograder.lab10_auto_parallel.workers import call, plan_result
from common.model import ModelConfig

MODEL = {"num_layers": 6, "width": 256, "num_heads": 8, "num_kv_heads": 2, "vocab_size": 1024, "ffn_width": 640,
         "max_seq_len": 512}
WORKLOAD = {"global_batch": 24, "seq_len": 512, "param_bytes": 2, "grad_bytes": 2, "optimizer_bytes": 12,
            "activation_bytes": 2}


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _grid(config: ModelConfig, devices: int, batch: int, gpus_per_node: int):
    """(priced plans, refused (dp, tp, pp)) as the planner's docstring defines the grid."""
    priced, refused = [], []
    for tp in _divisors(devices):
        for pp in _divisors(devices // tp):
            dp = devices // (tp * pp)
            kv_ok = config.num_kv_heads % tp == 0 or tp % config.num_kv_heads == 0
            ok = (config.num_heads % tp == 0 and kv_ok and config.hidden_width % tp == 0
                  and config.vocab_size % tp == 0 and config.num_layers % pp == 0 and tp <= gpus_per_node
                  and batch % dp == 0 and not (pp > 1 and config.tie_embeddings))
            if not ok:
                refused.append((dp, tp, pp))
                continue
            for m in (m for m in _divisors(batch // dp) if m <= 512):
                for zero in ([0] if dp == 1 else [0, 1] if pp > 1 else [0, 1, 2, 3]):
                    for ckpt in (False, True):
                        priced.append({"dp": dp, "tp": tp, "pp": pp, "num_microbatches": m, "zero_stage": zero,
                                       "checkpointing": ckpt})
    return priced, refused


def _key(plan: dict):
    return (plan.get("dp", 1), plan.get("tp", 1), plan.get("pp", 1), plan.get("num_microbatches", 1),
            plan.get("zero_stage", 0), plan.get("checkpointing", False))


@pytest.mark.points(5)
def test_best_plan_and_table(student):
    """On 8 devices (2 nodes of 4) under a cap that rules out some plans: every grid point appears once (the best,
    or a rejected plan); the best is as fast as the fastest plan that fits, priced here with the formulas; plans over
    the cap are rejected for memory, slower ones are ranked by time, refused shapes carry their reason."""
    cap = 4.0e7
    got = student.run(plan_result, MODEL, TWO_LEVEL, WORKLOAD, cap, 8)
    assert isinstance(got, dict), f"plan_training returned {got!r}"
    config = ModelConfig(**MODEL)
    priced, refused = _grid(config, 8, WORKLOAD["global_batch"], TWO_LEVEL["gpus_per_node"])
    fits = {_key(p): step(config, p, WORKLOAD, TWO_LEVEL)["total"] for p in priced
            if memory(config, p, WORKLOAD)["total"] <= cap}
    assert fits and len(fits) < len(priced), "test setup: the cap should rule out some plans, not all"
    seen = [_key(got["best"])] + [_key(r["plan"]) for r in got["rejected"]]
    assert len(seen) == len(set(seen)), "a plan appears twice in the best + rejected list"
    expected = {_key(p) for p in priced} | {(dp, tp, pp, 1, 0, False) for dp, tp, pp in refused}
    missing, unexpected = sorted(expected - set(seen))[:4], sorted(set(seen) - expected)[:4]
    assert set(seen) == expected, (f"the plans considered differ from the grid: missing {missing}, "
                                   f"unexpected {unexpected}")
    fastest = min(fits.values())
    best = _key(got["best"])
    assert best in fits and math.isclose(fits[best], fastest, rel_tol=1e-9), (
        f"the best plan {got['best']} should be among the fastest that fit ({fastest:.6g} s), it takes "
        f"{fits.get(best, 'over the cap')}")
    assert math.isclose(got["cost"]["total"], fastest, rel_tol=1e-9), (
        f"the best plan's predicted step {got['cost']['total']:.6g} s differs from {fastest:.6g} s")
    times = [r["step_s"] for r in got["rejected"] if r["step_s"] is not None]
    assert times == sorted(times), "the rejected plans that fit must be ranked by step time"
    for row in got["rejected"]:
        key = _key(row["plan"])
        if key in fits:
            assert row["step_s"] is not None and "slower" in row["reason"], f"{row} should be rejected as slower"
        elif row["memory"] is not None:
            assert row["memory"] > cap and "cap" in row["reason"], f"{row} should be rejected for memory over the cap"
        else:
            assert row["reason"], f"{row} was refused without a reason"


@pytest.mark.points(2)
def test_degree_problem(student):
    """degree_problem names the degree and the size it does not divide (heads, K/V heads, layers), and tied
    embeddings across stages; "" when both degrees are fine."""
    config = {**MODEL, "width": 384, "num_heads": 12, "num_kv_heads": 4, "ffn_width": 768, "vocab_size": 1200}
    cases = [(8, 1, "num_heads"), (3, 1, "3"), (2, 4, "num_layers"), (6, 3, "6"), (4, 2, ""), (1, 1, "")]
    got = student.run(call, [{"module": "planner", "fn": "degree_problem", "args": [("config", config)],
                              "kwargs": {"tp": tp, "pp": pp}} for tp, pp, _ in cases])
    got += student.run(call, [{"module": "planner", "fn": "degree_problem",
                               "args": [("config", {**MODEL, "tie_embeddings": True})], "kwargs": {"tp": 1, "pp": 2}}])
    for (tp, pp, word), value in zip(cases, got):
        if word:
            assert isinstance(value, str) and word in value and value, (
                f"degree_problem(tp={tp}, pp={pp}) on {config} = {value!r}, expected a reason naming {word!r}")
        else:
            assert value == "", f"degree_problem(tp={tp}, pp={pp}) = {value!r}, expected '' (both divide)"
    assert "tie" in got[-1], f"degree_problem with tied embeddings at pp 2 = {got[-1]!r}, expected a reason"


@pytest.mark.points(3)
def test_refuses_impossible(student):
    """plan_training raises ValueError: a cap below what the most sharded plan needs ("does not fit even fully
    sharded", naming the cap); 3 devices for a model whose heads, layers and batch 3 divides none of."""
    small_cap = student.run(plan_result, MODEL, TWO_LEVEL, WORKLOAD, 1e6, 8)
    assert isinstance(small_cap, str) and small_cap.startswith("ValueError") and "fully sharded" in small_cap \
        and "0.001 GB" in small_cap, f"a 1 MB cap should be refused as not fitting even fully sharded: {small_cap!r}"
    odd = {**MODEL, "num_layers": 4}
    no_degree = student.run(plan_result, odd, TWO_LEVEL, {**WORKLOAD, "global_batch": 16}, None, 3)
    assert isinstance(no_degree, str) and no_degree.startswith("ValueError") and "divide" in no_degree, (
        f"3 devices for 8 heads, 4 layers and batch 16 should be refused (no degree divides): {no_degree!r}")


@pytest.mark.points(2)
def test_flops_per_device(student):
    """flops_per_device: the step's executed FLOPs (3 x the forward, 4 x the blocks' with checkpointing) over the
    predicted step time and the devices."""
    got = student.run(plan_result, MODEL, TWO_LEVEL, WORKLOAD, 4.0e7, 8)
    config = ModelConfig(**MODEL)
    from autograder.lab10_auto_parallel.formulas import forward_flops, head

    B, s = WORKLOAD["global_batch"], WORKLOAD["seq_len"]
    blocks, out = config.num_layers * forward_flops(config, B, s), head(config, B, s)
    executed = 3 * (blocks + out) * (4 / 3 if got["best"]["checkpointing"] else 1)
    want = executed / got["cost"]["total"] / 8
    assert math.isclose(got["flops_per_device"], want, rel_tol=1e-9), (
        f"flops_per_device = {got['flops_per_device']:.6g}, expected {want:.6g} for {got['best']}")
