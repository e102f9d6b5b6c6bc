"""Benchmark: activation memory and step time of each checkpoint plan, against torch.utils.checkpoint (GPU).

Runs, in one process and on the same inputs, a GPT-2-small-size model (common.model preset "gpt2", bf16 autocast,
B8 N1024 by default) with:
    none                                no checkpointing
    ours every_k=2 / every_k=1 / sqrt   this lab's plans (full recomputation of checkpointed blocks)
    ours selective                      selective recomputation (Korthikanti et al. 2022): norms, attention core and
                                        SwiGLU activation recomputed, every GEMM output kept
    torch non-reentrant / reentrant     the peers: torch.utils.checkpoint around every block, use_reentrant False/True

For each it records the activation bytes autograd saves (SavedTensorMeter), the CUDA peak memory of a training step,
and the step time. Timing follows the kit's method (common.bench): every variant warmed up, then all of them timed
interleaved over rounds in rotating order; medians are reported with their spread, and a target is met only when the
whole spread of the ratio to "none" clears it. Correctness comes first: every variant's gradients are compared with
the plain model's on a small fp32 model (dropout on) before anything is timed.

Why the two peers differ: reentrant checkpoint runs the segment's forward under no_grad and replays it in backward,
as ours does. Non-reentrant checkpoint runs the forward *with* autograd, recording the whole graph, and swaps every
saved tensor for a placeholder through saved-tensor hooks (a Python call per saved tensor, dozens per block); in
backward the first unpack replays the forward. It supports more (nested checkpoints, early stop, non-tensor outputs),
and it pays for it in step time. `--profile` prints where the time of none, ours every_k=1 and both peers goes.

Targets (docs/performance.md): the sqrt plan within 1.35x of "none"; selective recomputation at least 40% fewer
activation bytes within 1.1x.

    PYTHONPATH=reference:labs python -m lab01_memory.benchmark --out results/
    PYTHONPATH=reference:labs python -m lab01_memory.benchmark --smoke          # a seconds-long check on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.utils.checkpoint as torch_checkpoint

from common.bench import environment, interleaved
from common.measure import SavedTensorMeter, cuda_peak_memory
from common.model import ModelConfig, Transformer

from .plans import CheckpointConfig, apply_checkpointing
from .selective import SelectiveConfig, apply_selective_recomputation

PLANS = {
    "ours every_k=2": CheckpointConfig(plan="every_k", k=2),
    "ours every_k=1": CheckpointConfig(plan="every_k", k=1),
    "ours sqrt": CheckpointConfig(plan="sqrt"),
}
TARGETS = {"ours sqrt": dict(time_at_most=1.35), "ours selective": dict(time_at_most=1.10, saving_at_least=0.40)}

# -----------------------------------------------------------------------------
# The variants


def torch_runner(*, reentrant: bool):
    """The peer: torch.utils.checkpoint around every block."""

    def run(blocks, x, cos, sin):
        for block in blocks:
            x = torch_checkpoint.checkpoint(block, x, cos, sin, use_reentrant=reentrant)
        return x

    return run


def variants(model: Transformer) -> dict[str, Transformer]:
    out = {"none": model}
    for name, config in PLANS.items():
        out[name] = apply_checkpointing(copy.deepcopy(model), config=config)
    out["ours selective"] = apply_selective_recomputation(copy.deepcopy(model), config=SelectiveConfig())
    for name, reentrant in (("torch non-reentrant", False), ("torch reentrant", True)):
        peer = copy.deepcopy(model)
        peer.block_runner = torch_runner(reentrant=reentrant)
        out[name] = peer
    return out


def check_gradients(device: torch.device) -> float:
    """Max relative gradient difference of every variant against the plain model (small fp32 model, dropout on)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_layers=6, dropout=0.1)).to(device)
    tokens = torch.randint(0, 256, (4, 64), device=device)
    reference, worst = None, 0.0
    for name, variant in variants(model).items():
        variant.zero_grad()
        torch.manual_seed(1)
        variant.loss(tokens, tokens).backward()
        grads = torch.cat([p.grad.flatten() for p in variant.parameters()])
        if reference is None:
            reference = grads
            continue
        error = ((grads - reference).norm() / reference.norm()).item()
        worst = max(worst, error)
        if error > 1e-5:
            raise RuntimeError(f"{name}: gradients differ from the plain model (relative error {error:.2e})")
    return worst


# -----------------------------------------------------------------------------
# Measuring


def training_step(model: Transformer, tokens: torch.Tensor, device: torch.device):
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.loss(tokens, tokens)
        loss.backward()

    return step


def memory(model: Transformer, tokens: torch.Tensor, device: torch.device) -> dict:
    """Saved activation bytes of one forward, and (on a GPU) the peak memory of a step above what was allocated."""
    not_activations = list(model.parameters()) + list(model.buffers())
    step = training_step(model, tokens, device)
    step()  # gradients allocated once, outside the peak
    with SavedTensorMeter(exclude=not_activations) as meter, torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model.loss(tokens, tokens)
    del loss
    peak = cuda_peak_memory(step) if device.type == "cuda" else None
    return {"saved_activation_bytes": meter.total_bytes, "cuda_peak_bytes": peak}


def memory_timeline(model: Transformer, tokens: torch.Tensor, device: torch.device, points: int = 400) -> dict:
    """Allocated CUDA bytes over one training step, from torch's allocator history (downsampled to `points`)."""
    step = training_step(model, tokens, device)
    step()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    allocated, series = 0, []
    for trace in snapshot.get("device_traces", [[]])[device.index or 0]:
        if trace["action"] == "alloc":
            allocated += trace["size"]
        elif trace["action"] == "free_completed":
            allocated -= trace["size"]
        else:
            continue
        series.append(allocated)
    stride = max(1, len(series) // points)
    return {"baseline_bytes": base, "allocated_bytes": series[::stride], "events": len(series)}


def profile(model: Transformer, tokens: torch.Tensor, device: torch.device, top: int = 8) -> str:
    """The top operators by self time over a few steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = training_step(model, tokens, device)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


# -----------------------------------------------------------------------------
# The run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--reps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--profile", action="store_true", help="print where the time of four variants goes")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on whatever device: checks the script")
    parser.add_argument("--out", type=Path, default=None, help="directory for the results JSON")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("lab01_memory.benchmark needs a CUDA GPU (use --smoke to check the script on a CPU)")

    max_error = check_gradients(device)
    print(f"correctness: every variant's gradients match the plain model (max relative error {max_error:.1e})")

    torch.manual_seed(0)
    preset, batch, seq = ("tiny", 2, 64) if args.smoke else ("gpt2", args.batch_size, args.seq_len)
    config = ModelConfig.preset(preset, max_seq_len=seq)
    model = Transformer(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    models = variants(model)
    rows = {name: memory(variant, tokens, device) for name, variant in models.items()}
    rounds, reps = (2, 1) if args.smoke else (args.rounds, args.reps)
    timing = interleaved({name: training_step(v, tokens, device) for name, v in models.items()},
                         rounds=rounds, reps=reps, warmup=1 if args.smoke else 3, device=device)

    base = rows["none"]
    print(f"\n{preset} ({model.num_params() / 1e6:.0f} M params), bf16 autocast, B{batch} N{seq}, "
          f"{environment()['gpu'] or 'CPU'}; median [min-max] over {rounds} interleaved rounds of {reps} steps")
    print(f"{'variant':>20} {'saved act (MiB)':>16} {'vs none':>8} {'peak (MiB)':>11} {'step ms':>22} "
          f"{'time vs none':>24}")
    verdicts = {}
    for name, row in rows.items():
        row["activation_saving"] = 1 - row["saved_activation_bytes"] / base["saved_activation_bytes"]
        row["step_ms"] = timing.time(name).as_dict()
        ratio = timing.ratio(name, "none")
        row["time_ratio"] = ratio.as_dict()
        peak = f"{row['cuda_peak_bytes'] / 2**20:11.0f}" if row["cuda_peak_bytes"] is not None else f"{'-':>11}"
        print(f"{name:>20} {row['saved_activation_bytes'] / 2**20:16.1f} {-row['activation_saving']:+8.0%} {peak} "
              f"{str(timing.time(name)):>22} {str(ratio) + 'x':>24}")
        if name in TARGETS:
            target = TARGETS[name]
            verdict = ratio.verdict(at_most=target["time_at_most"])
            if "saving_at_least" in target and row["activation_saving"] < target["saving_at_least"]:
                verdict = "missed"
            verdicts[name] = {"target": target, "verdict": verdict}
    print("\ntargets (met only when the whole spread clears them):")
    for name, item in verdicts.items():
        print(f"  {name}: {item['target']} -> {item['verdict']}")

    result = {"benchmark": "lab01_memory.benchmark", "environment": environment(), "smoke": args.smoke,
              "shape": {"batch_size": batch, "seq_len": seq, "preset": preset, "params": model.num_params(),
                        "dtype": "bf16 autocast"},
              "gradient_check_max_relative_error": max_error, "timing": timing.as_dict(), "variants": rows,
              "targets": verdicts}
    if device.type == "cuda":
        result["memory_timeline"] = {name: memory_timeline(models[name], tokens, device)
                                     for name in ("none", "ours sqrt", "ours selective", "torch non-reentrant")}
    if args.profile:
        for name in ("none", "ours every_k=1", "torch reentrant", "torch non-reentrant"):
            print(f"\n--- {name}: top operators by self time ---\n{profile(models[name], tokens, device)}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lab01_benchmark.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
