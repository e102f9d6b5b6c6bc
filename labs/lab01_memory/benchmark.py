"""Benchmark: activation memory and step time of each checkpoint plan against torch.utils.checkpoint (GPU).

Runs, in one process and on the same inputs, a GPT-2-small-size model (common.model preset "gpt2", bf16 autocast,
B8 N1024 by default) with:
    none                      no checkpointing
    ours every_k=2 / every_k=1 / sqrt   this lab's plans
    torch.utils.checkpoint    the peer: every block checkpointed with use_reentrant=False

For each it records the activation bytes autograd saves (SavedTensorMeter), the CUDA peak memory of a training step,
and the median step time (CUDA events), then prints each against "none". Correctness comes first: every plan's
gradients are compared with the plain model's on a small fp32 batch before anything is timed.

Target (docs/performance.md): at least 45% less activation memory at no more than 1.3x the step time.

    PYTHONPATH=reference:labs python -m lab01_memory.benchmark --out results/
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
from pathlib import Path

import torch
import torch.utils.checkpoint as torch_checkpoint

from common.measure import SavedTensorMeter, cuda_peak_memory, require_cuda, time_fn
from common.model import ModelConfig, Transformer

from .plans import CheckpointConfig, apply_checkpointing

PLANS = {
    "ours every_k=2": CheckpointConfig(plan="every_k", k=2),
    "ours every_k=1": CheckpointConfig(plan="every_k", k=1),
    "ours sqrt": CheckpointConfig(plan="sqrt"),
}


def torch_runner(blocks, x, cos, sin):
    """The peer: torch.utils.checkpoint around every block."""
    for block in blocks:
        x = torch_checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
    return x


def variants(model: Transformer) -> dict[str, Transformer]:
    out = {"none": model}
    for name, config in PLANS.items():
        out[name] = apply_checkpointing(copy.deepcopy(model), config=config)
    peer = copy.deepcopy(model)
    peer.block_runner = torch_runner
    out["torch.utils.checkpoint"] = peer
    return out


def check_gradients(device: torch.device) -> float:
    """Max relative gradient difference of every variant against the plain model (small fp32 model, dropout on)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_layers=6, dropout=0.1)).to(device)
    tokens = torch.randint(0, 256, (4, 64), device=device)
    reference = None
    worst = 0.0
    for name, variant in variants(model).items():
        variant.zero_grad()
        torch.manual_seed(1)
        variant.loss(tokens, tokens).backward()
        grads = torch.cat([p.grad.flatten() for p in variant.parameters()])
        if reference is None:
            reference = grads
        else:
            error = ((grads - reference).norm() / reference.norm()).item()
            worst = max(worst, error)
            if error > 1e-5:
                raise RuntimeError(f"{name}: gradients differ from the plain model (relative error {error:.2e})")
    return worst


def measure(model: Transformer, tokens: torch.Tensor, steps: int) -> dict:
    not_activations = list(model.parameters()) + list(model.buffers())

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(tokens, tokens)
        loss.backward()

    step()  # warm-up, and gradients allocated once outside the peak measurement
    with SavedTensorMeter(exclude=not_activations) as meter, torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(tokens, tokens)
    del loss
    peak = cuda_peak_memory(step)
    timing = time_fn(step, warmup=2, repeats=steps, device="cuda")
    return {"saved_activation_bytes": meter.total_bytes, "cuda_peak_bytes": peak, "step_ms": timing.median_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="directory for the results JSON")
    args = parser.parse_args()
    device = require_cuda("lab01_memory.benchmark")

    max_error = check_gradients(device)
    print(f"correctness: every variant's gradients match the plain model (max relative error {max_error:.1e})")

    torch.manual_seed(0)
    config = ModelConfig.preset("gpt2", max_seq_len=args.seq_len)
    model = Transformer(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    rows = {}
    for name, variant in variants(model).items():
        rows[name] = measure(variant, tokens, args.steps)
        torch.cuda.empty_cache()

    base = rows["none"]
    print(f"\nGPT-2-small size ({model.num_params() / 1e6:.0f} M params), bf16 autocast, "
          f"B{args.batch_size} N{args.seq_len}, {torch.cuda.get_device_name()}")
    print(f"{'variant':>24} {'saved act (GiB)':>16} {'vs none':>8} {'peak (GiB)':>11} {'vs none':>8} "
          f"{'step (ms)':>10} {'vs none':>8}")
    for name, row in rows.items():
        row["activation_saving"] = 1 - row["saved_activation_bytes"] / base["saved_activation_bytes"]
        row["peak_saving"] = 1 - row["cuda_peak_bytes"] / base["cuda_peak_bytes"]
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
        print(f"{name:>24} {row['saved_activation_bytes'] / 2**30:16.2f} {-row['activation_saving']:+8.0%} "
              f"{row['cuda_peak_bytes'] / 2**30:11.2f} {-row['peak_saving']:+8.0%} {row['step_ms']:10.1f} "
              f"{row['time_ratio']:7.2f}x")
    meets = {name: row["activation_saving"] >= 0.45 and row["time_ratio"] <= 1.3
             for name, row in rows.items() if name.startswith("ours")}
    print("\ntarget (>= 45% less activation memory at <= 1.3x time):",
          ", ".join(f"{name}: {'met' if ok else 'missed'}" for name, ok in meets.items()))

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {
            "benchmark": "lab01_memory.benchmark",
            "date": datetime.date.today().isoformat(),
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "shape": {"batch_size": args.batch_size, "seq_len": args.seq_len, "preset": "gpt2",
                      "params": model.num_params(), "dtype": "bf16 autocast"},
            "gradient_check_max_relative_error": max_error,
            "variants": rows,
            "target_met": meets,
        }
        (args.out / "lab01_benchmark.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
