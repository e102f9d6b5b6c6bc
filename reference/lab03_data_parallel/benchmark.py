"""Benchmark: data-parallel training throughput and all-reduce bandwidth on NCCL, the reference against its peers.

    PYTHONPATH=reference:labs torchrun --nproc_per_node 2 -m lab03_data_parallel.benchmark --out results/

1. Correctness first: on fresh random inputs, the ring all-reduce equals NCCL's (fp32 and bf16, uneven sizes), and one
   step of naive and bucketed DDP gives the gradients torch DDP gives.
2. Throughput, all in this run: GPT-2-small (`ModelConfig.preset("gpt2")`, ~124 M parameters, tied embeddings) under
   bf16 autocast with fp32 master weights and fused AdamW, B8 N1024 per GPU: single GPU (each rank alone, no
   communication), naive DDP, bucketed DDP at several caps, torch DDP (its defaults: 25 MiB buckets). All variants are
   built first and timed in interleaved rounds (CUDA events, median of round medians, the slowest rank's); tokens/s =
   world_size * B * N / step time. Target: bucketed DDP >= 0.95x torch DDP.
3. Bandwidth against message size: the ring all-reduce of collectives.py against `dist.all_reduce` (NCCL), reported
   as bus bandwidth, with the alpha-beta model fitted to the ring's times.

Rank 0 writes benchmark.json (GPU, versions, date, every figure) and benchmark.png into --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.dist import init_from_env
from common.measure import time_fn
from common.model import ModelConfig, Transformer
from common.testing import check_close

from .collectives import AlphaBeta, bus_bandwidth, ring_all_reduce
from .ddp_bucketed import BucketConfig, BucketedDDP
from .ddp_naive import NaiveDDP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="directory for benchmark.json and benchmark.png")
    parser.add_argument("--batch-size", type=int, default=8, help="B per GPU")
    parser.add_argument("--seq-len", type=int, default=1024, help="N")
    parser.add_argument("--caps", type=float, nargs="+", default=[1.0, 5.0, 25.0, 100.0], help="bucket caps, MiB")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant, split over --rounds")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--model", default="gpt2", help="a ModelConfig preset")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check the script itself on CPU with gloo (tiny model, tiny sizes; figures meaningless)")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.model, args.batch_size, args.seq_len, args.warmup, args.steps, args.rounds = "tiny", 2, 32, 1, 2, 2
    elif not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise SystemExit("this benchmark needs CUDA GPUs and NCCL: run it with "
                         "`torchrun --nproc_per_node 2 -m lab03_data_parallel.benchmark` on a machine with 2+ GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    info = init_from_env()
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {
        "gpu": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu (smoke test)",
        "world_size": info.world_size, "backend": info.backend, "torch": torch.__version__,
        "triton": _triton_version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if info.device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "batch_size_per_gpu": args.batch_size, "seq_len": args.seq_len,
        "precision": "bf16 autocast, fp32 master weights, fused AdamW",
    }
    results["correctness"] = check_correctness(info, args)
    _say(info, f"correctness: {results['correctness']}")
    results["throughput"] = measure_throughput(info, args)
    results["bandwidth"] = measure_bandwidth(info, max_log2=18 if args.cpu_smoke else 30)
    if info.is_main:
        summarise(results)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "benchmark.png")
        print(f"wrote {out / 'benchmark.json'}")
    dist.barrier()
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 1. Correctness


def check_correctness(info, args) -> dict:
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator(device=info.device).manual_seed(100 + info.rank)
        x = torch.randn(1_000_003, generator=generator, device=info.device).to(dtype)  # uneven over any p > 1
        expected = x.clone()
        dist.all_reduce(expected)
        got = ring_all_reduce(x.clone())
        # the ring adds in another order than NCCL: compare at the dtype's tolerance
        check_close(got, expected, name="ring_all_reduce against NCCL", dtype=dtype)
        report[f"ring_all_reduce {str(dtype)[6:]} max abs error"] = (got.float() - expected.float()).abs().max().item()
    grads = {}
    for name in ("torch", "naive", "bucketed"):
        model, step = _build(name, info, args, cap_mb=25.0)
        step()
        inner = model.module
        grads[name] = [p.grad.float().clone() for p in inner.parameters() if p.requires_grad]
        del model, step, inner
        _free()
    for name in ("naive", "bucketed"):
        worst = 0.0
        for got, expected in zip(grads[name], grads["torch"]):
            check_close(got, expected, name=f"{name} DDP gradient against torch DDP", dtype=torch.bfloat16)
            worst = max(worst, (got - expected).abs().max().item())
        report[f"{name} DDP grad max abs error vs torch DDP"] = worst
    return report


# -----------------------------------------------------------------------------
# 2. Throughput


def measure_throughput(info, args) -> dict:
    """Every variant is built once, warmed up, then timed in `args.rounds` interleaved rounds whose order rotates, so
    clock and thermal drift hit all variants alike. A variant's step time is the median of its round medians."""
    variants = ["single", "torch", "naive"] + [f"bucketed:{cap:g}" for cap in args.caps]
    built = {}
    for variant in variants:
        name, _, cap = variant.partition(":")
        built[variant] = _build(name, info, args, cap_mb=float(cap or 25.0))
        for _ in range(args.warmup):
            built[variant][1]()
    rounds: dict[str, list[float]] = {variant: [] for variant in variants}
    per_round = max(1, args.steps // args.rounds)
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            rounds[variant].append(_time_steps(built[variant][1], 1, per_round, info))
    table = {}
    for variant in variants:
        name, _, cap = variant.partition(":")
        model, step = built[variant]
        median_ms = statistics.median(rounds[variant])
        ranks = 1 if name == "single" else info.world_size
        table[variant] = {
            "step_ms": median_ms, "round_medians_ms": rounds[variant],
            "tokens_per_s": ranks * args.batch_size * args.seq_len / (median_ms / 1e3),
            "buckets": model.num_buckets if isinstance(model, BucketedDDP) else None,
        }
        _say(info, f"{variant:>14}: {median_ms:7.2f} ms/step, {table[variant]['tokens_per_s'] / 1e3:7.1f} k tokens/s "
                   f"(rounds: {', '.join(f'{t:.1f}' for t in rounds[variant])})")
        if name == "bucketed" and float(cap) == 25.0:
            table[variant]["overlap"] = _overlap_probe(model, step)
    del built
    _free()
    return table


def _build(name: str, info, args, *, cap_mb: float):
    """A fresh GPT-2 replica wrapped as `name`, and a closure running one training step on fixed random tokens."""
    torch.manual_seed(0)
    config = ModelConfig.preset(args.model, max_seq_len=max(args.seq_len, 128))
    module = Transformer(config).to(info.device)
    if name == "torch":
        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=25)
        sync = None
    elif name == "naive":
        model = NaiveDDP(module)
        sync = model.sync_gradients
    elif name == "bucketed":
        model = BucketedDDP(module, config=BucketConfig(bucket_cap_mb=cap_mb))
        sync = model.finish
    else:  # "single": this rank alone
        model, sync = module, None
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator(device=info.device).manual_seed(1 + info.rank)  # each rank its own data
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=info.device,
                           generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(info.device.type, dtype=torch.bfloat16):
            logits = model(inputs)  # (B, N, V): through the wrapper, so torch DDP sees its forward
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        if sync is not None:
            sync()
        optimizer.step()

    return model, step


def _time_steps(step, warmup: int, steps: int, info) -> float:
    """The median step time in ms (CUDA events on a GPU), the slowest rank's: that is the job's step time."""
    dist.barrier()
    timing = time_fn(step, warmup=warmup, repeats=steps, device=info.device.type)
    median = torch.tensor([timing.median_ms], device=info.device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def _overlap_probe(model: BucketedDDP, step) -> dict:
    """One logged step: when the first bucket's all-reduce was launched, relative to the last gradient (host time)."""
    model.config = BucketConfig(bucket_cap_mb=model.config.bucket_cap_mb, record_events=True)
    model.events.clear()
    step()
    kinds = [kind for kind, *_ in model.events]
    first_launch = model.events[kinds.index("launch")][2]
    last_ready = max(t for kind, _, t in model.events if kind == "grad_ready")
    launched_before = sum(1 for kind, _, t in model.events if kind == "launch" and t < last_ready)
    model.config = BucketConfig(bucket_cap_mb=model.config.bucket_cap_mb)
    return {"first_launch_before_last_grad_ms": (last_ready - first_launch) * 1e3,
            "buckets_launched_during_backward": launched_before, "buckets": model.num_buckets}


# -----------------------------------------------------------------------------
# 3. Bandwidth


def measure_bandwidth(info, *, max_log2: int) -> dict:
    sizes = [2**k for k in range(12, max_log2 + 1, 2)]  # 4 KiB .. 1 GiB of fp32
    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 4, device=info.device)
        repeats = 20 if nbytes <= 2**24 else 5
        row = {"bytes": nbytes}
        for name, fn in (("ring", lambda: ring_all_reduce(x)), ("nccl", lambda: dist.all_reduce(x))):
            seconds = _time_collective(fn, repeats, info)
            row[f"{name}_us"] = seconds * 1e6
            row[f"{name}_busbw_GBps"] = bus_bandwidth(nbytes, seconds, info.world_size) / 1e9
        rows.append(row)
        _say(info, f"{nbytes:>11} B  ring {row['ring_us']:9.1f} us {row['ring_busbw_GBps']:6.1f} GB/s   "
                   f"nccl {row['nccl_us']:9.1f} us {row['nccl_busbw_GBps']:6.1f} GB/s")
        del x
    fit = AlphaBeta.fit([r["bytes"] for r in rows], [r["ring_us"] / 1e6 for r in rows], world_size=info.world_size)
    return {"rows": rows, "ring_alpha_us": fit.alpha_s * 1e6,
            "ring_link_GBps": (1 / fit.beta_s_per_byte / 1e9) if fit.beta_s_per_byte else None}


def _time_collective(fn, repeats: int, info) -> float:
    """Median seconds of one collective, the slowest rank's."""
    dist.barrier()
    timing = time_fn(fn, warmup=3, repeats=repeats, device=info.device.type)
    median = torch.tensor([timing.median_ms / 1e3], device=info.device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


# -----------------------------------------------------------------------------
# Report


def summarise(results: dict) -> None:
    table = results["throughput"]
    torch_ddp = table["torch"]["tokens_per_s"]
    for variant, row in table.items():
        row["vs_torch_ddp"] = row["tokens_per_s"] / torch_ddp
    bucketed = {k: v for k, v in table.items() if k.startswith("bucketed")}
    best = max(bucketed, key=lambda k: bucketed[k]["tokens_per_s"])
    default = table.get("bucketed:25", table[best])
    results["target"] = {
        "rule": "bucketed DDP >= 0.95x torch DDP tokens/s",
        "bucketed_25MiB_vs_torch_ddp": default["vs_torch_ddp"], "best_cap": best,
        "best_vs_torch_ddp": table[best]["vs_torch_ddp"], "met": table[best]["vs_torch_ddp"] >= 0.95,
        "scaling_torch_ddp_vs_single": torch_ddp / table["single"]["tokens_per_s"],
    }
    print(json.dumps({k: {kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                      for k, v in table.items()}, indent=1))
    print("target:", json.dumps(results["target"]))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = results["throughput"]
    names = list(table)
    left.bar(names, [table[n]["tokens_per_s"] / 1e3 for n in names], color="tab:blue")
    left.set_ylabel("k tokens / s")
    left.set_title(f"{results['model']} B{results['batch_size_per_gpu']} N{results['seq_len']}, "
                   f"{results['world_size']}x {results['gpu']}")
    left.tick_params(axis="x", rotation=30)
    rows = results["bandwidth"]["rows"]
    sizes = [r["bytes"] for r in rows]
    for name in ("ring", "nccl"):
        right.plot(sizes, [r[f"{name}_busbw_GBps"] for r in rows], marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_xlabel("message size (bytes)")
    right.set_ylabel("bus bandwidth (GB/s)")
    right.legend()
    right.set_title("all-reduce: our ring vs NCCL")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _say(info, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
