"""Benchmark: data-parallel training throughput and all-reduce bandwidth, the reference against its peers.

    PYTHONPATH=reference:labs python -m lab03_data_parallel.benchmark --out results/      # 2+ GPUs, NCCL
    PYTHONPATH=reference:labs python -m lab03_data_parallel.benchmark --smoke --out /tmp/b  # CPU, gloo, seconds

The script starts its own ranks (`common.launch.run_distributed`, one per GPU); under torchrun it uses torchrun's.

1. Correctness first: on fresh random inputs, the ring all-reduce equals NCCL's (fp32 and bf16, uneven sizes), and one
   step of naive and bucketed DDP gives the gradients torch DDP gives.
2. Throughput: GPT-2-small (`ModelConfig.preset("gpt2")`, ~124 M parameters, tied embeddings) under bf16 autocast
   with fp32 master weights and fused AdamW, B8 N1024 per GPU: single GPU (each rank alone, no communication), naive
   DDP, bucketed DDP at several caps, and the peers a user would otherwise call: torch DDP (its defaults, 25 MiB
   buckets) and torch DDP compiled with `torch.compile` (TorchDynamo's DDPOptimizer splits the graph at bucket
   boundaries so communication still overlaps backward). All variants are built and warmed up first, then timed by
   `common.bench.interleaved` (rounds whose order rotates, CUDA events); each round's median is the slowest rank's.
   Target: bucketed DDP at least 0.95x torch DDP's tokens/s, "met" only when the whole spread of the per-round ratio
   clears it (`Spread.verdict`).
3. Bandwidth against message size: the ring all-reduce of collectives.py against `dist.all_reduce` (NCCL), interleaved
   per size, reported as bus bandwidth with the spread, and the alpha-beta model fitted to the ring's times.

benchmark.json (environment: GPU, versions, date; every figure with its spread) and benchmark.png go to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.bench import Interleaved, environment, interleaved
from common.dist import init_from_env
from common.launch import run_distributed
from common.model import ModelConfig, Transformer
from common.testing import check_close

from .collectives import AlphaBeta, bus_bandwidth, ring_all_reduce
from .ddp_bucketed import BucketConfig, BucketedDDP
from .ddp_naive import NaiveDDP

TARGET = 0.95  # bucketed DDP's tokens/s over torch DDP's, at least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="directory for benchmark.json and benchmark.png")
    parser.add_argument("--batch-size", type=int, default=8, help="B per GPU")
    parser.add_argument("--seq-len", type=int, default=1024, help="N")
    parser.add_argument("--caps", type=float, nargs="+", default=[1.0, 5.0, 25.0, 100.0], help="bucket caps, MiB")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--reps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--model", default="gpt2", help="a ModelConfig preset")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled peer")
    parser.add_argument("--world-size", type=int, default=None, help="ranks to start (default: every GPU)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="the whole run's limit")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU with gloo: 2 ranks, tiny model and sizes (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch_size, args.seq_len, args.caps = "tiny", 2, 32, [0.01, 25.0]
        args.warmup, args.rounds, args.reps, args.compile_backend = 1, 3, 2, "aot_eager"
    options = vars(args)
    if "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        results = bench_rank(init_from_env(), options)
    else:
        if not args.smoke and torch.cuda.device_count() < 2:
            raise SystemExit("this benchmark needs 2+ CUDA GPUs (NCCL); check the script on CPU with --smoke")
        world_size = args.world_size or (2 if args.smoke else torch.cuda.device_count())
        results = run_distributed(bench_rank, world_size=world_size, args=(options,), timeout_s=args.timeout_s,
                                  backend="gloo" if args.smoke else "nccl")[0]
    if results is not None:
        report(results, Path(args.out))


def bench_rank(info, options: dict) -> dict | None:
    """Every measurement on this rank; rank 0 returns the results (the others None)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {"environment": {**environment(), "backend": info.backend, "world_size": info.world_size,
                               "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                               if info.device.type == "cuda" else None},
               "options": {k: v for k, v in options.items() if k != "out"},
               "precision": "bf16 autocast, fp32 master weights, fused AdamW"}
    results["correctness"] = check_correctness(info, options)
    _say(info, f"correctness: {results['correctness']}")
    results["throughput"] = measure_throughput(info, options)
    results["bandwidth"] = measure_bandwidth(info, options, max_log2=16 if options["smoke"] else 30)
    if dist.is_initialized() and "WORLD_SIZE" in os.environ:
        dist.barrier()
        dist.destroy_process_group()
    return results if info.is_main else None


# -----------------------------------------------------------------------------
# 1. Correctness


def check_correctness(info, options: dict) -> dict:
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator(device=info.device).manual_seed(100 + info.rank)
        x = torch.randn(1_000_003, generator=generator, device=info.device).to(dtype)  # uneven over any p > 1
        expected = x.clone()
        dist.all_reduce(expected)
        got = ring_all_reduce(x.clone())
        # the ring adds in another order than NCCL: compare at the dtype's tolerance
        check_close(got, expected, name="ring_all_reduce against dist.all_reduce", dtype=dtype)
        report[f"ring_all_reduce {str(dtype)[6:]} max abs error"] = (got.float() - expected.float()).abs().max().item()
    grads = {}
    for name in ("torch", "naive", "bucketed"):
        model, step = build(name, info, options, cap_mb=25.0)
        step()
        grads[name] = [w.grad.float().clone() for w in _inner(model).parameters() if w.requires_grad]
        del model, step
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


def measure_throughput(info, options: dict) -> dict:
    """Every variant built once, then timed by common.bench.interleaved; round medians are the slowest rank's."""
    variants = ["single", "torch", "torch+compile", "naive"] + [f"bucketed:{cap:g}" for cap in options["caps"]]
    built = {}
    for variant in variants:
        name, _, cap = variant.partition(":")
        built[variant] = build(name, info, options, cap_mb=float(cap or 25.0))
    steps = {variant: step for variant, (_, step) in built.items()}
    timing = _slowest_rank(interleaved(steps, rounds=options["rounds"], reps=options["reps"], warmup=options["warmup"],
                                       device=info.device, sync=dist.barrier if info.device.type == "cpu" else None))
    _say(info, timing.table(baseline="torch"))
    tokens = options["batch_size"] * options["seq_len"]
    table = {}
    for variant in variants:
        model = built[variant][0]
        ranks = 1 if variant == "single" else info.world_size
        spread = timing.time(variant)
        table[variant] = {
            "step_ms": spread.as_dict(),
            "tokens_per_s": ranks * tokens / (spread.median / 1e3),
            "buckets": model.num_buckets if isinstance(model, BucketedDDP) else None,
        }
        if variant != "torch":
            # tokens/s relative to torch DDP, per round: the inverse of the per-round ratio of step times
            ratio = timing.ratio("torch", variant)
            scale = ranks / info.world_size  # "single" runs one rank's batch per step
            table[variant]["vs_torch_ddp"] = {key: (value * scale if key != "values" else [v * scale for v in value])
                                              for key, value in ratio.as_dict().items()}
    bucketed = [v for v in variants if v.startswith("bucketed")]
    best = max(bucketed, key=lambda v: timing.ratio("torch", v).median)
    default = "bucketed:25" if "bucketed:25" in bucketed else best
    target = {"rule": f"bucketed DDP >= {TARGET}x torch DDP tokens/s over the whole spread of per-round ratios",
              "default_cap": default, "best_cap": best}
    for key, variant in (("default", default), ("best", best)):
        ratio = timing.ratio("torch", variant)
        target[f"{key}_vs_torch_ddp"] = ratio.as_dict()
        target[f"{key}_verdict"] = ratio.verdict(at_least=TARGET)
        target[f"{key}_vs_compiled_torch_ddp"] = timing.ratio("torch+compile", variant).as_dict()
    table["target"] = target
    table["timing"] = timing.as_dict()
    overlap_model, overlap_step = built[default]
    table[default]["overlap"] = _overlap_probe(overlap_model, overlap_step)
    del built, steps
    _free()
    return table


def build(name: str, info, options: dict, *, cap_mb: float):
    """A fresh replica wrapped as `name`, and a closure running one training step on fixed random tokens."""
    torch.manual_seed(0)
    config = ModelConfig.preset(options["model"], max_seq_len=max(options["seq_len"], 128))
    module = Transformer(config).to(info.device)
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    sync = None
    if name in ("torch", "torch+compile"):
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=25)
        if name == "torch+compile":
            model = torch.compile(model, backend=options["compile_backend"])
    elif name == "naive":
        model = NaiveDDP(module)
        sync = model.sync_gradients
    elif name == "bucketed":
        model = BucketedDDP(module, config=BucketConfig(bucket_cap_mb=cap_mb))
        sync = model.finish
    else:  # "single": this rank alone
        model = module
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator(device=info.device).manual_seed(1 + info.rank)  # each rank its own data
    tokens = torch.randint(0, config.vocab_size, (options["batch_size"], options["seq_len"] + 1), device=info.device,
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


def _slowest_rank(result: Interleaved) -> Interleaved:
    """Each round median replaced by the largest over ranks: the job is as fast as its slowest rank."""
    names = list(result.rounds_ms)
    table = torch.tensor([result.rounds_ms[name] for name in names], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    return Interleaved(rounds_ms={name: table[i].tolist() for i, name in enumerate(names)}, reps=result.reps,
                       order=result.order)


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


def measure_bandwidth(info, options: dict, *, max_log2: int) -> dict:
    sizes = [2**k for k in range(12, max_log2 + 1, 2)]  # 4 KiB .. 1 GiB of fp32
    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 4, device=info.device)
        reps = 20 if nbytes <= 2**24 else 5
        timing = _slowest_rank(interleaved({"ring": lambda: ring_all_reduce(x), "nccl": lambda: dist.all_reduce(x)},
                                           rounds=options["rounds"], reps=reps, warmup=3, device=info.device,
                                           sync=dist.barrier if info.device.type == "cpu" else None))
        row = {"bytes": nbytes, "ring_over_nccl_time": timing.ratio("ring", "nccl").as_dict()}
        for name in ("ring", "nccl"):
            spread = timing.time(name)
            row[f"{name}_us"] = {k: (v * 1e3 if k != "values" else [t * 1e3 for t in v])
                                 for k, v in spread.as_dict().items()}
            row[f"{name}_busbw_GBps"] = bus_bandwidth(nbytes, spread.median / 1e3, info.world_size) / 1e9
        rows.append(row)
        _say(info, f"{nbytes:>11} B  ring {row['ring_us']['median']:9.1f} us {row['ring_busbw_GBps']:6.1f} GB/s   "
                   f"nccl {row['nccl_us']['median']:9.1f} us {row['nccl_busbw_GBps']:6.1f} GB/s   "
                   f"ring/nccl time {timing.ratio('ring', 'nccl')}")
        del x
    fit = AlphaBeta.fit([r["bytes"] for r in rows], [r["ring_us"]["median"] / 1e6 for r in rows],
                        world_size=info.world_size)
    return {"rows": rows, "ring_alpha_us": fit.alpha_s * 1e6,
            "ring_link_GBps": (1 / fit.beta_s_per_byte / 1e9) if fit.beta_s_per_byte else None}


# -----------------------------------------------------------------------------
# Report


def report(results: dict, out: Path) -> None:
    table = results["throughput"]
    target = table["target"]
    for key in ("default", "best"):
        ratio = target[f"{key}_vs_torch_ddp"]
        compiled = target[f"{key}_vs_compiled_torch_ddp"]
        print(f"{target[f'{key}_cap']} vs torch DDP: {ratio['median']:.3f}x [{ratio['low']:.3f}-{ratio['high']:.3f}] "
              f"-> target {TARGET}x {target[f'{key}_verdict']}; vs compiled torch DDP: {compiled['median']:.3f}x "
              f"[{compiled['low']:.3f}-{compiled['high']:.3f}]")
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "benchmark.png")
    print(f"wrote {out / 'benchmark.json'}")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    table = {k: v for k, v in results["throughput"].items() if "tokens_per_s" in v}
    names = list(table)
    tokens = results["options"]["batch_size"] * results["options"]["seq_len"]
    heights, errors = [], [[], []]
    for name in names:
        ranks = 1 if name == "single" else results["environment"]["world_size"]
        step = table[name]["step_ms"]
        rate = [ranks * tokens / (t / 1e3) / 1e3 for t in (step["median"], step["high"], step["low"])]
        heights.append(rate[0])
        errors[0].append(rate[0] - rate[1])
        errors[1].append(rate[2] - rate[0])
    left.bar(names, heights, yerr=errors, capsize=3, color="tab:blue")
    left.set_ylabel("k tokens / s (bars: spread over rounds)")
    env = results["environment"]
    left.set_title(f"{results['options']['model']} B{results['options']['batch_size']} "
                   f"N{results['options']['seq_len']}, {env['world_size']}x {env.get('gpu') or 'CPU'}")
    left.tick_params(axis="x", rotation=30)
    rows = results["bandwidth"]["rows"]
    sizes = [r["bytes"] for r in rows]
    for name in ("ring", "nccl"):
        right.plot(sizes, [r[f"{name}_busbw_GBps"] for r in rows], marker="o",
                   label=name if name == "ring" else f"dist.all_reduce ({env['backend']})")
    right.set_xscale("log", base=2)
    right.set_xlabel("message size (bytes)")
    right.set_ylabel("bus bandwidth (GB/s)")
    right.legend()
    right.set_title("all-reduce: our ring vs the backend's")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _inner(model):
    """The nn.Module under a wrapper (torch DDP, ours, or a compiled one)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _say(info, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
