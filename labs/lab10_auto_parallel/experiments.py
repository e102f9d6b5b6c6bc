"""Experiments the notebook, the deck and the benchmark run: the planner against published configurations, and
predicted against measured step times of plans run here on CPU (gloo).

Not graded. Rank functions are top-level (spawned processes import them).

Usage:
    rows = megatron_comparison()           # Narayanan et al. 2021, Table 1, beside the planner's pick
    rows = measure_cpu_plans(CPU_PLANS)    # predicted (cpu-gloo profile) and measured seconds per step
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from common.launch import run_distributed
from common.model import ModelConfig

from .cost_model import ParallelPlan, Workload, model_flops_per_step, step_time
from .memory_model import memory_per_device
from .planner import plan_training
from .profiles import load_profile

PUBLISHED_PATH = Path(__file__).with_name("published.json")

# CPU plans: one process, 2 and 4 ranks of every shape (8 in the benchmark), a tiny model (C 64) in fp32
CPU_PLANS = [
    {"plan": {}, "num_layers": 2, "batch_size": 4, "seq_len": 16},
    {"plan": {}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
    {"plan": {"dp": 2}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
    {"plan": {"tp": 2}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
    {"plan": {"pp": 2, "num_microbatches": 8}, "num_layers": 16, "batch_size": 64, "seq_len": 32},
    {"plan": {"dp": 2, "zero_stage": 3, "checkpointing": True}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
    {"plan": {"dp": 2, "pp": 2, "num_microbatches": 4}, "num_layers": 8, "batch_size": 32, "seq_len": 32},
    {"plan": {"tp": 2, "pp": 2, "num_microbatches": 4}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
]
CPU_PLANS_8 = [{"plan": {"dp": 2, "tp": 2, "pp": 2, "num_microbatches": 4}, "num_layers": 8, "batch_size": 32,
                "seq_len": 32}]


def published() -> dict:
    """published.json: {"megatron": [...], "alpa": [...]}."""
    return json.loads(PUBLISHED_PATH.read_text())


def gpt_config(row: dict, *, seq_len: int) -> ModelConfig:
    """A GPT row as common.model's config: multi-head attention, vocabulary 51,200, the SwiGLU width whose three
    matrices hold the 8 h^2 parameters of GPT's 4h MLP (the Llama rule, 8h/3 rounded up to 16)."""
    return ModelConfig(vocab_size=51200, max_seq_len=seq_len, num_layers=row["layers"], num_heads=row["heads"],
                       num_kv_heads=row["heads"], width=row["hidden"])


def megatron_comparison(profile: str = "a100-80gb-selene") -> list[dict]:
    """For each Megatron-LM row: the published tp, pp and TFLOP/s per GPU; the planner's pick and its predicted
    TFLOP/s per GPU; and what the cost model predicts for the published plan (best m, checkpointing, ZeRO 0)."""
    cluster = load_profile(profile)
    rows = []
    for row in published()["megatron"]:
        config = gpt_config(row, seq_len=2048)
        workload = Workload(global_batch=row["batch"], seq_len=2048)
        result = plan_training(config, cluster, workload=workload, num_devices=row["gpus"])
        theirs = _best_for_shape(config, cluster.with_devices(row["gpus"]), workload, tp=row["tp"], pp=row["pp"],
                                 devices=row["gpus"], memory_cap=cluster.memory_bytes)
        rows.append({"model": f"{row['params_b']}B", "gpus": row["gpus"], "batch": row["batch"],
                     "published": f"tp{row['tp']} pp{row['pp']}", "published_tflops": row["tflops_per_gpu"],
                     "planner": result.best.describe(), "planner_tflops": result.flops_per_device / 1e12,
                     "published_plan_predicted_tflops": theirs})
    return rows


def alpa_comparison(profile: str = "v100-p3-16xlarge") -> list[dict]:
    """For each of Alpa's GPT-3 models: the planner's pick on the V100 cluster and its predicted PFLOP/s in all."""
    cluster = load_profile(profile)
    rows = []
    for row in published()["alpa"]:
        config = gpt_config(row, seq_len=1024)
        workload = Workload(global_batch=row["batch"], seq_len=1024)
        try:
            result = plan_training(config, cluster, workload=workload, num_devices=row["gpus"])
            pick, pflops = result.best.describe(), result.flops_per_device * row["gpus"] / 1e15
        except ValueError as error:
            pick, pflops = f"refused: {error}", None
        rows.append({"model": f"{row['params_b']}B", "gpus": row["gpus"], "planner": pick,
                     "planner_pflops": pflops, "published_pflops": None})
    return rows


def _best_for_shape(config, cluster, workload, *, tp, pp, devices, memory_cap) -> float | None:
    """Predicted TFLOP/s per device of the published shape with checkpointing, ZeRO 0, the best micro-batch count."""
    dp = devices // (tp * pp)
    best = None
    for m in (m for m in range(1, workload.global_batch // dp + 1) if (workload.global_batch // dp) % m == 0):
        plan = ParallelPlan(dp=dp, tp=tp, pp=pp, num_microbatches=m, checkpointing=True)
        if memory_per_device(config, plan, workload=workload).total > memory_cap:
            continue
        seconds = step_time(config, plan, workload=workload, cluster=cluster).total
        best = seconds if best is None else min(best, seconds)
    if best is None:
        return None
    executed = 4 / 3 * model_flops_per_step(config, global_batch=workload.global_batch, seq_len=workload.seq_len)
    return executed / best / devices / 1e12


# -----------------------------------------------------------------------------
# CPU: predicted against measured


def measure_cpu_plans(cases: list[dict], *, repeats: int = 3) -> list[dict]:
    """For each case {plan, num_layers, batch_size, seq_len}: predicted (cpu-gloo) and measured seconds per step
    (median over `repeats` steps after a warm-up, of the slowest rank), with the measured spread."""
    rows = []
    for case in cases:
        plan = ParallelPlan(**case["plan"])
        config = ModelConfig.preset("tiny", num_layers=case["num_layers"], max_seq_len=case["seq_len"])
        workload = Workload(global_batch=case["batch_size"], seq_len=case["seq_len"], param_bytes=4, grad_bytes=4,
                            optimizer_bytes=8, activation_bytes=4)
        cluster = load_profile("cpu-gloo").with_devices(plan.world_size)
        predicted = step_time(config, plan, workload=workload, cluster=cluster).total
        times = run_distributed(_time_rank, world_size=plan.world_size, args=(case, repeats), timeout_s=300)
        steps = [max(rank[i] for rank in times) for i in range(1, repeats + 1)]
        rows.append({"plan": plan.describe(), "world": plan.world_size, "layers": case["num_layers"],
                     "batch": case["batch_size"], "predicted_s": predicted, "measured_s": statistics.median(steps),
                     "min_s": min(steps), "max_s": max(steps)})
    return rows


def _time_rank(info, case: dict, repeats: int) -> list[float]:
    from common.data import get_batch, load_corpus
    from common.model import Transformer

    from .execute import run_plan

    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", num_layers=case["num_layers"], max_seq_len=case["seq_len"])
    batch = get_batch(load_corpus(max_tokens=20_000), batch_size=case["batch_size"], seq_len=case["seq_len"], seed=0)
    return run_plan(ParallelPlan(**case["plan"]), Transformer(config), [batch] * (repeats + 1)).step_times


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected)."""
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(len(v)), key=v.__getitem__))}  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    n = len(xs)
    if n < 2:
        return 1.0
    return 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def demo_losses(plans: list[dict], *, steps: int = 3) -> dict[str, list[float]]:
    """Losses of `steps` steps of run_plan under each plan (2 ranks, tiny fp64 model), and of one process."""
    from common.testing import corpus_batch, tiny_model

    results = run_distributed(_demo_rank, world_size=2, args=(plans, steps), timeout_s=300)[0]
    model = tiny_model(num_layers=2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    single = []
    for seed in range(steps):
        loss = model.loss(*corpus_batch(batch_size=4, seq_len=16, seed=seed))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        single.append(loss.item())
    return {**{ParallelPlan(**plan).describe(): losses for plan, losses in zip(plans, results)},
            "one process": single}


def _demo_rank(info, plans: list[dict], steps: int) -> list[list[float]]:
    from common.testing import corpus_batch, tiny_model

    from .execute import run_plan

    batches = [corpus_batch(batch_size=4, seq_len=16, seed=seed) for seed in range(steps)]
    return [run_plan(ParallelPlan(**plan), tiny_model(num_layers=2, seed=0), batches).losses for plan in plans]
