"""Benchmark: expert parallelism over several GPUs: the expert-parallel MoE layer against the same layer with every
expert replicated on every rank, and the all-to-all bandwidth it reaches.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=reference:labs torchrun --nproc_per_node 4 -m lab09_moe.benchmark_ep --out results/
    PYTHONPATH=reference:labs python -m lab09_moe.benchmark_ep --smoke        # CPU: 2 gloo ranks, tiny shapes

Each rank routes T tokens of width C (bf16) through an MoE layer of E SwiGLU experts (default E64 top-6 F1408,
DeepSeek-MoE-like; E must divide by the number of ranks P):

    expert parallel   ExpertParallelMoE: E/P experts per rank, two all-to-alls in forward (two more in backward)
    replicated        the unsharded MoELayer on every rank: P times the expert memory, no communication
    all-to-all        the dispatch and combine exchanges alone, with the same split sizes as the layer's

Correctness first: the expert-parallel output on every rank is compared with the replicated layer's (same weights).
Reported per variant: forward and forward+backward time (common.bench.interleaved, CUDA events; the slowest rank's
median), expert-parameter bytes per rank, and the all-to-all's bytes per rank (measured and from
arithmetic.all_to_all_bytes) over its time. Rank 0 writes lab09_ep_benchmark.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=8192, help="T per rank")
    parser.add_argument("--width", type=int, default=2048, help="C")
    parser.add_argument("--experts", type=int, default=64, help="E")
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--ffn-width", type=int, default=1408, help="F of each expert")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: 2 gloo ranks, tiny shapes")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.width, args.experts, args.top_k, args.ffn_width = 16, 32, 4, 2, 16
        args.rounds, args.reps = 2, 2
    if "WORLD_SIZE" not in os.environ:
        if not args.smoke:
            raise SystemExit("launch with torchrun on 2+ GPUs, e.g. `torchrun --nproc_per_node 4 -m "
                             "lab09_moe.benchmark_ep`, or check the script on a CPU with --smoke")
        from common.launch import run_distributed

        results = run_distributed(run, world_size=2, args=(vars(args),), backend="gloo", timeout_s=600)
        report(results[0], args.out)
        return
    from common.dist import init_from_env

    info = init_from_env()
    result = run(info, vars(args))
    if info.is_main:
        report(result, args.out)
    dist.barrier()
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# One rank


def run(info, options: dict) -> dict:
    """Build, check and time the variants on this rank; returns rank 0's report (other ranks: their own)."""
    from common.bench import environment, interleaved
    from common.mesh import build_mesh

    from .arithmetic import all_to_all_bytes
    from .expert_parallel import AllToAll, ExpertParallelMoE
    from .moe_layer import MoEConfig, MoELayer

    device = info.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "torch"  # the interpreter would take minutes on CPU
    group = build_mesh(dp=info.world_size).dp_group
    T, C = options["tokens"], options["width"]
    config = MoEConfig(num_experts=options["experts"], top_k=options["top_k"], ffn_width=options["ffn_width"],
                       backend=backend)
    torch.manual_seed(0)  # the same weights on every rank
    replicated = MoELayer(C, config).to(device=device, dtype=dtype)
    sharded_source = MoELayer(C, config).to(device=device, dtype=dtype)
    sharded_source.load_state_dict(replicated.state_dict())
    sharded = ExpertParallelMoE(sharded_source, ep_group=group)
    generator = torch.Generator(device=device).manual_seed(1 + info.rank)  # different tokens on every rank
    x = torch.randn(T, C, generator=generator, device=device, dtype=torch.float32).to(dtype)
    dy = torch.randn(T, C, generator=generator, device=device, dtype=torch.float32).to(dtype)

    with torch.no_grad():
        error = (sharded(x).float() - replicated(x).float()).abs().max().item()
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4  # the same math, rows summed in another grouping
    if error > tolerance:
        raise RuntimeError(f"rank {info.rank}: expert-parallel output differs from the replicated layer's by {error}")

    # the all-to-all alone, with the layer's own split sizes
    with torch.no_grad():
        plan, _ = sharded.plan(sharded.router(x))
    send_counts = plan.counts.view(info.world_size, -1)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    rows = torch.randn(sum(send), C, device=device, dtype=torch.float32).to(dtype)

    def exchange():
        back = AllToAll.apply(rows, recv, send, group)
        return AllToAll.apply(back, send, recv, group)

    def step(layer, backward):
        if not backward:
            with torch.no_grad():
                return layer(x)
        leaf = x.detach().requires_grad_(True)
        layer(leaf).backward(dy)
        layer.zero_grad(set_to_none=True)

    sync = (lambda: dist.barrier(group=group)) if device.type == "cpu" else None
    figures = {}
    for label, backward in (("forward", False), ("forward+backward", True)):
        calls = {"expert parallel": lambda b=backward: step(sharded, b),
                 "replicated": lambda b=backward: step(replicated, b)}
        if not backward:
            calls["all-to-all (dispatch + combine)"] = exchange
        timing = interleaved(calls, rounds=options["rounds"], reps=options["reps"], warmup=2, device=device,
                             sync=sync)
        medians = torch.tensor([timing.time(name).median for name in calls], dtype=torch.float64, device=device)
        dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
        figures[label] = {name: ms for name, ms in zip(calls, medians.tolist())}
        figures[label + " (rank 0's spreads)"] = timing.as_dict()

    sent_bytes = 2 * (sum(send) - send[info.rank]) * C * x.element_size()  # rows that leave this rank, both ways
    model_bytes = all_to_all_bytes(num_tokens=T, width=C, top_k=config.top_k, ep_size=info.world_size,
                                   bytes_per_element=x.element_size())
    expert_bytes = {name: sum(p.numel() * p.element_size() for p in (layer.w_gate_up, layer.w_down))
                    for name, layer in (("expert parallel", sharded), ("replicated", replicated))}
    exchange_ms = figures["forward"]["all-to-all (dispatch + combine)"]
    return {"environment": environment(), "world_size": info.world_size, "backend": info.backend,
            "shape": {"tokens_per_rank": T, "width": C, "experts": config.num_experts, "top_k": config.top_k,
                      "ffn_width": config.ffn_width, "dtype": str(dtype).removeprefix("torch."),
                      "expert_backend": backend},
            "max_abs_error_vs_replicated": error, "times_ms": figures, "expert_bytes_per_rank": expert_bytes,
            "all_to_all": {"bytes_sent_per_rank_measured": sent_bytes, "bytes_per_rank_formula": model_bytes,
                           "algorithmic_bandwidth_GBps": sent_bytes / (exchange_ms * 1e-3) / 1e9}}


# -----------------------------------------------------------------------------
# Report


def report(result: dict, out: Path | None) -> None:
    shape = result["shape"]
    print(f"{result['world_size']} ranks ({result['backend']}, {result['environment'].get('gpu') or 'cpu'}), "
          f"T={shape['tokens_per_rank']} per rank, C={shape['width']}, E{shape['experts']} top-{shape['top_k']} "
          f"F{shape['ffn_width']}, {shape['dtype']}; "
          f"max |EP - replicated| = {result['max_abs_error_vs_replicated']:.3g}")
    for label in ("forward", "forward+backward"):
        times = result["times_ms"][label]
        ratio = times["expert parallel"] / times["replicated"]
        print(f"  {label:<17} " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
              + f"   (EP / replicated: {ratio:.2f}x the time)")
    a2a = result["all_to_all"]
    memory = result["expert_bytes_per_rank"]
    print(f"  all-to-all: {a2a['bytes_sent_per_rank_measured'] / 2**20:.1f} MiB sent per rank (formula, uniform "
          f"routing: {a2a['bytes_per_rank_formula'] / 2**20:.1f} MiB), {a2a['algorithmic_bandwidth_GBps']:.1f} GB/s")
    print(f"  expert weights per rank: {memory['expert parallel'] / 2**20:.1f} MiB expert-parallel, "
          f"{memory['replicated'] / 2**20:.1f} MiB replicated")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "lab09_ep_benchmark.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out / 'lab09_ep_benchmark.json'}")


if __name__ == "__main__":
    main()
