"""Benchmark: the cost model's predicted step time against the measured one for every plan that runs here (CPU,
gloo, world 1, 2, 4 and 8), and the planner's pick against the plan a user would otherwise take (pure data
parallelism), timed interleaved in one job.

1. Correctness first: run_plan under dp 2 (fp64) gives one process's losses to 1e-9.
2. Predicted vs measured: each plan of experiments.CPU_PLANS (+ world 4 and 8 plans) runs 1 + R steps of a tiny
   model (C 64, fp32); the measured step is the median over R steps of the slowest rank; the prediction uses the
   "cpu-gloo" profile. Reported: the table, Spearman's rank correlation, and a scatter plot (PNG).
3. Planner vs default: on 4 ranks, plan_training's pick for the tiny model (cpu-gloo profile) and dp 4 with ZeRO 0,
   both built in the same ranks and timed in interleaved rounds (common.bench.interleaved, a barrier after each
   step); the ratio default / pick per round, with its spread and the verdict "pick at least as fast" (>= 1.0).
4. --calibrate: measures what profiles.json's "cpu-gloo" entry holds (one-thread fp32 GEMM FLOP/s, gloo's alpha
   and bandwidth from two all-reduce sizes at world 2, the per-block overhead) and prints the values.

    PYTHONPATH=reference:labs python -m lab10_auto_parallel.benchmark --out DIR
    PYTHONPATH=reference:labs python -m lab10_auto_parallel.benchmark --smoke --out /tmp/lab10
    PYTHONPATH=reference:labs python -m lab10_auto_parallel.benchmark --calibrate --out /tmp/lab10

GPU multi-node runs are out of scope: the GPU profiles are datasheet figures, compared with published results in
the notebook instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.bench import environment, interleaved
from common.launch import run_distributed
from common.model import ModelConfig, Transformer

from .cost_model import ParallelPlan, Workload, step_time
from .experiments import CPU_PLANS, CPU_PLANS_8, measure_cpu_plans, spearman
from .profiles import load_profile

WORLD_4 = [{"plan": {"dp": 4}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
           {"plan": {"tp": 4}, "num_layers": 8, "batch_size": 16, "seq_len": 32},
           {"plan": {"pp": 4, "num_microbatches": 8}, "num_layers": 8, "batch_size": 32, "seq_len": 32},
           {"plan": {"dp": 2, "tp": 2}, "num_layers": 8, "batch_size": 16, "seq_len": 32}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--smoke", action="store_true", help="a few plans, few steps (seconds)")
    parser.add_argument("--calibrate", action="store_true", help="measure the cpu-gloo profile's values")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment()}
    if args.calibrate:
        report["calibration"] = calibrate()
        print(json.dumps(report["calibration"], indent=2))
    report["correctness"] = check_correctness()
    print(f"correctness: dp 2 losses within {report['correctness']['max_error']:.2g} of one process")
    cases = CPU_PLANS[:3] if args.smoke else CPU_PLANS + WORLD_4 + CPU_PLANS_8
    rows = measure_cpu_plans(cases, repeats=2 if args.smoke else 4)
    report["plans"] = rows
    report["spearman"] = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    print(f"{'plan':<34} {'world':>5} {'predicted ms':>13} {'measured ms':>12} {'spread ms':>16}")
    for r in rows:
        print(f"{r['plan'] + ' L' + str(r['layers']):<34} {r['world']:>5} {r['predicted_s'] * 1e3:>13.1f} "
              f"{r['measured_s'] * 1e3:>12.1f} {r['min_s'] * 1e3:>7.1f}-{r['max_s'] * 1e3:<8.1f}")
    print(f"Spearman rank correlation, predicted vs measured: {report['spearman']:.3f}")
    world = 2 if args.smoke else 4
    report["pick_vs_default"] = run_distributed(_versus_rank, world_size=world, args=(args.smoke,),
                                                timeout_s=600)[0]
    versus = report["pick_vs_default"]
    print(f"planner's pick {versus['pick']} vs default {versus['default']} at world {world}: default / pick "
          f"{versus['ratio']['median']:.2f}x (spread {versus['ratio']['low']:.2f}-{versus['ratio']['high']:.2f}), "
          f"predicted {versus['predicted_ratio']:.2f}x; pick at least as fast: {versus['verdict']}")
    (args.out / "lab10_benchmark.json").write_text(json.dumps(report, indent=2))
    scatter(rows, args.out / "lab10_predicted_vs_measured.png")
    print(f"wrote {args.out / 'lab10_benchmark.json'} and {args.out / 'lab10_predicted_vs_measured.png'}")


def scatter(rows: list[dict], path: Path) -> None:
    """Predicted against measured seconds per step, log-log, one colour per world size, the diagonal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for world in sorted({r["world"] for r in rows}):
        chosen = [r for r in rows if r["world"] == world]
        ax.scatter([r["predicted_s"] * 1e3 for r in chosen], [r["measured_s"] * 1e3 for r in chosen],
                   label=f"world {world}")
    values = [r[k] * 1e3 for r in rows for k in ("predicted_s", "measured_s")]
    low, high = min(values) / 1.5, max(values) * 1.5
    ax.plot([low, high], [low, high], "k--", lw=1, label="measured = predicted")
    ax.set(xscale="log", yscale="log", xlabel="predicted ms / step", ylabel="measured ms / step",
           title="cost model vs CPU (gloo)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_correctness() -> dict:
    """dp 2 under run_plan (fp64, 2 steps) against one process with torch's AdamW."""
    from common.testing import corpus_batch, tiny_model

    losses = run_distributed(_correct_rank, world_size=2, timeout_s=300)[0]
    model = tiny_model(num_layers=2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    want = []
    for seed in range(2):
        loss = model.loss(*corpus_batch(batch_size=4, seq_len=16, seed=seed))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        want.append(loss.item())
    error = max(abs(a - b) for a, b in zip(losses, want))
    if error > 1e-9:
        raise SystemExit(f"run_plan's losses {losses} differ from one process's {want}")
    return {"losses": losses, "single_process": want, "max_error": error}


def _correct_rank(info):
    from common.testing import corpus_batch, tiny_model

    from .execute import run_plan

    batches = [corpus_batch(batch_size=4, seq_len=16, seed=seed) for seed in range(2)]
    return run_plan(ParallelPlan(dp=2), tiny_model(num_layers=2, seed=0), batches).losses


def _versus_rank(info, smoke: bool) -> dict:
    from common.data import get_batch, load_corpus

    from .execute import PlanTrainer
    from .planner import plan_training

    config = ModelConfig.preset("tiny", num_layers=8, max_seq_len=32)
    workload = Workload(global_batch=16, seq_len=32, param_bytes=4, grad_bytes=4, optimizer_bytes=8,
                        activation_bytes=4)
    cluster = load_profile("cpu-gloo")
    pick = plan_training(config, cluster, workload=workload, num_devices=info.world_size).best
    default = ParallelPlan(dp=info.world_size)
    batch = get_batch(load_corpus(max_tokens=20_000), batch_size=16, seq_len=32, seed=0)
    trainers = {}
    for name, plan in (("pick", pick), ("default", default)):
        torch.manual_seed(0)
        trainers[name] = PlanTrainer(plan, Transformer(config))
    result = interleaved({name: (lambda t=t: t.step(*batch)) for name, t in trainers.items()},
                         rounds=2 if smoke else 7, reps=1 if smoke else 3, warmup=1, device="cpu", sync=dist.barrier)
    ratio = result.ratio("default", "pick")
    sized = cluster.with_devices(info.world_size)
    predicted = (step_time(config, default, workload=workload, cluster=sized).total
                 / step_time(config, pick, workload=workload, cluster=sized).total)
    verdict = "same plan" if pick == default else ratio.verdict(at_least=1.0)
    return {"pick": pick.describe(), "default": default.describe(), "timing": result.as_dict(),
            "ratio": ratio.as_dict(), "predicted_ratio": predicted, "verdict": verdict}


def calibrate() -> dict:
    """One-thread fp32 GEMM FLOP/s; gloo all-reduce alpha and bandwidth at world 2; the per-block overhead."""
    torch.set_num_threads(1)
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    began = time.perf_counter()
    for _ in range(100):
        a @ b
    flops = 100 * 2 * 512 * 256 * 256 / (time.perf_counter() - began)
    small, large = run_distributed(_allreduce_rank, world_size=2, args=(1 << 6, 1 << 22), timeout_s=120)[0]
    bandwidth = 2 * (1 / 2) * ((1 << 22) - (1 << 6)) / max(large - small, 1e-9)
    alpha = small / 2
    config = ModelConfig.preset("tiny", num_layers=8, max_seq_len=16)
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (1, 16))
    for _ in range(3):
        model.loss(tokens, tokens).backward()
    began = time.perf_counter()
    for _ in range(10):
        model.loss(tokens, tokens).backward()
    overhead = (time.perf_counter() - began) / 10 / config.num_layers
    return {"peak_flops": flops, "alpha": alpha, "bandwidth": bandwidth, "layer_overhead_s": overhead}


def _allreduce_rank(info, small: int, large: int) -> list[float]:
    out = []
    for numel in (small // 4, large // 4):
        buffer = torch.ones(numel)
        for _ in range(3):
            dist.all_reduce(buffer)
        began = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buffer)
        out.append((time.perf_counter() - began) / 10)
    return out


if __name__ == "__main__":
    main()
