"""Benchmark: a tensor-parallel block against torch's parallelize_module, and the pipeline runtime against
torch.distributed.pipelining, on however many GPUs torchrun gives it.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=reference:labs torchrun --nproc_per_node 4 -m lab04_model_parallel.benchmark --out DIR
    PYTHONPATH=reference:labs torchrun --nproc_per_node 2 -m lab04_model_parallel.benchmark --smoke --out /tmp/b

1. Tensor parallelism, t = world size: one Llama-style block (common.model.Block, bf16, B x N tokens), forward and
   backward. Variants: "single" (each GPU runs the whole block alone: the t = 1 baseline), "ours"
   (tensor_parallel.ParallelBlock, loaded with sharding's rule), "torch" (the same Block under
   `parallelize_module` with ColwiseParallel on q/k/v/gate/up and RowwiseParallel on out/down). Correctness first:
   in fp32, both tensor-parallel outputs and input gradients equal the single block's. Target: ours at least 0.95x
   torch's throughput (time ratio at most 1/0.95 over the whole spread).
2. Pipeline parallelism, p = world size, m = 4p micro-batches, 4 blocks per stage (byte vocabulary, so the stages
   are balanced): our runtime (GPipe, 1F1B) against torch's ScheduleGPipe / Schedule1F1B on the same stage modules,
   after checking they give the same loss. Targets: at least 0.95x torch's throughput; the bubble measured from our
   runtime's CUDA-event timelines within 10% of (p-1)/(m+p-1).

Timing: common.bench.interleaved (variants in rotating order, round medians, spreads); pipeline steps on the host
clock with a CUDA synchronize and a barrier after each, so a step's time is the slowest rank's. Rank 0 writes
benchmark.json (with common.bench.environment()) and benchmark.png (timelines and bubbles) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from common.bench import Interleaved, environment, interleaved
from common.dist import init_from_env
from common.mesh import build_mesh
from common.model import Attention, Block, ModelConfig, Transformer, apply_rope, rope_tables
from common.testing import check_close

from .pipeline import PipelineConfig, PipelineRuntime, PipelineStage, cross_entropy_loss
from .schedules import bubble_fraction
from .sharding import shard_parameter
from .tensor_parallel import ParallelBlock

TP_TARGET, BUBBLE_TOLERANCE = 0.95, 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="directory for benchmark.json and benchmark.png")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--batch-size", type=int, default=4, help="B of the tensor-parallel block")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="sequences per pipeline micro-batch")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--blocks-per-stage", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CPU/gloo check of the script (tiny sizes, figures "
                                                             "meaningless)")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.heads, args.kv_heads, args.ffn, args.seq_len = 64, 4, 2, 96, 32
        args.batch_size, args.micro_batch_size, args.blocks_per_stage, args.rounds, args.reps = 2, 1, 1, 2, 2
    elif not torch.cuda.is_available():
        raise SystemExit("the benchmark times GPUs: run it under torchrun on a GPU machine, or pass --smoke")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    info = init_from_env()
    results: dict = {"environment": environment(), "world_size": info.world_size, "backend": info.backend,
                     "smoke": args.smoke, "args": vars(args)}
    results["tensor_parallel"] = bench_tensor_parallel(info, args)
    results["pipeline"] = bench_pipeline(info, args)
    if info.is_main:
        print(json.dumps({"tensor_parallel": results["tensor_parallel"]["summary"],
                          "pipeline": results["pipeline"]["summary"]}, indent=1))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "benchmark.png")
        print(f"wrote {out / 'benchmark.json'}")
    dist.barrier()
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 1. Tensor parallelism


def _config(args, num_layers: int = 1) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, width=args.width, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       ffn_width=args.ffn, vocab_size=256, max_seq_len=args.seq_len)


def _tp_variants(info, args, dtype: torch.dtype, batch_size: int):
    """(single Block, our ParallelBlock, torch's parallelized Block, input x, rope tables), all from one seed."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from common.model import sdpa_attention

    config = _config(args)
    mesh = build_mesh(tp=info.world_size)
    torch.manual_seed(0)
    single = Block(config, sdpa_attention).to(info.device, dtype)
    ours = ParallelBlock(config, group=mesh.tp_group).to(info.device, dtype)
    ours.load_state_dict({name: shard_parameter(f"blocks.0.{name}", tensor, config=config, tp_rank=mesh.tp_rank,
                                                tp_size=mesh.tp_size) for name, tensor in single.state_dict().items()})
    theirs = Block(config, sdpa_attention)
    theirs.attn = _LocalWidthAttention(config, sdpa_attention)
    theirs.to(info.device, dtype).load_state_dict(single.state_dict())
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.out_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}
    parallelize_module(theirs, mesh.device_mesh["tp"], plan)
    generator = torch.Generator(device=info.device).manual_seed(1)  # the same input on every rank
    x = torch.randn(batch_size, args.seq_len, config.width, device=info.device, generator=generator).to(dtype)
    cos, sin = (t.to(info.device) for t in rope_tables(config.head_dim, args.seq_len, config.rope_theta))
    return single, ours, theirs, x, cos, sin


class _LocalWidthAttention(Attention):
    """common.model.Attention with its output reshaped to the local width: under parallelize_module each rank holds
    H / t heads, and Attention.forward's reshape to the full width C would fail."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)  # (B, H / t, N, D)
        k = self.k_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos[:N], sin[:N]), apply_rope(k, cos[:N], sin[:N])
        o = self.attention(q, k, v, causal=True)
        return self.dropout(self.out_proj(o.transpose(1, 2).reshape(B, N, -1)))


def _fwd_bwd(block, x, cos, sin):
    x = x.detach().requires_grad_()
    y = block(x, cos, sin)
    y.float().square().mean().backward()
    return y.detach(), x.grad


def bench_tensor_parallel(info, args) -> dict:
    # correctness in fp32 on a small batch: both parallel blocks against the single block
    single, ours, theirs, x, cos, sin = _tp_variants(info, args, torch.float32, 1)
    want_y, want_dx = _fwd_bwd(single, x, cos, sin)
    for name, block in (("ours", ours), ("torch", theirs)):
        y, dx = _fwd_bwd(block, x, cos, sin)
        check_close(y, want_y, name=f"{name} tensor-parallel block output", dtype="tf32")
        check_close(dx, want_dx, name=f"{name} tensor-parallel block input gradient", dtype="tf32")
    del single, ours, theirs, x
    dtype = torch.float32 if args.smoke else torch.bfloat16
    single, ours, theirs, x, cos, sin = _tp_variants(info, args, dtype, args.batch_size)
    variants = {name: (lambda block=block: _fwd_bwd(block, x, cos, sin))
                for name, block in (("single", single), ("ours", ours), ("torch", theirs))}
    timing = interleaved(variants, rounds=args.rounds, reps=args.reps, warmup=2,
                         device=info.device if info.device.type == "cuda" else "cpu",
                         sync=lambda: dist.barrier())
    ratio = timing.ratio("torch", "ours")  # > 1 when ours is faster: throughput of ours over torch's
    tokens = args.batch_size * args.seq_len
    summary = {"tp": info.world_size, "ours_ms": str(timing.time("ours")), "torch_ms": str(timing.time("torch")),
               "single_ms": str(timing.time("single")),
               "throughput_vs_torch": str(ratio), "target": f"at least {TP_TARGET}x torch",
               "verdict": ratio.verdict(at_least=TP_TARGET),
               "speedup_vs_single": str(timing.ratio("single", "ours")),
               "ours_tokens_per_s": tokens / (timing.time("ours").median / 1e3)}
    if info.is_main:
        print(f"tensor parallel block, t = {info.world_size}:\n{timing.table(baseline='torch')}")
    return {"timing": timing.as_dict(), "summary": summary}


# -----------------------------------------------------------------------------
# 2. Pipeline parallelism


def _stage(info, args, mesh):
    torch.manual_seed(0)
    model = Transformer(_config(args, num_layers=args.blocks_per_stage * mesh.pp_size))
    model.to(info.device, torch.float32 if args.smoke else torch.bfloat16)
    return PipelineStage(model, stage_index=mesh.pp_rank, num_stages=mesh.pp_size)


def _torch_step(schedule, stage, tokens, targets):
    from torch.distributed.pipelining import PipelineStage as TorchStage  # noqa: F401 (documented peer)

    losses: list = []
    if stage.is_first:
        schedule.step(tokens, target=targets, losses=losses)
    elif stage.is_last:
        schedule.step(target=targets, losses=losses)
    else:
        schedule.step()
    return torch.stack(losses).mean() if losses else None


def bench_pipeline(info, args) -> dict:
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    mesh = build_mesh(pp=info.world_size)
    p = mesh.pp_size
    m = 4 * p
    stage = _stage(info, args, mesh)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (args.micro_batch_size * m, args.seq_len), generator=generator).to(info.device)
    targets = torch.randint(0, 256, tokens.shape, generator=generator).to(info.device)
    runners, report = {}, {"num_stages": p, "num_microbatches": m}
    for name, peer in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        ours = PipelineRuntime(stage, pp_group=mesh.pp_group, config=PipelineConfig(num_microbatches=m, schedule=name))
        theirs = peer(TorchStage(stage, mesh.pp_rank, p, info.device, group=mesh.pp_group), m,
                      loss_fn=cross_entropy_loss)
        runners[f"ours {name}"] = lambda ours=ours: (stage.zero_grad(set_to_none=True), ours.step(tokens, targets))
        runners[f"torch {name}"] = lambda theirs=theirs: (stage.zero_grad(set_to_none=True),
                                                          _torch_step(theirs, stage, tokens, targets))
        # correctness first: the same loss (on the last stage) from both
        loss_ours, loss_theirs = runners[f"ours {name}"]()[1], runners[f"torch {name}"]()[1]
        if stage.is_last:
            check_close(loss_ours.float(), loss_theirs.float(), name=f"pipeline loss ({name}) against torch's",
                        dtype="bfloat16" if not args.smoke else "float32")
        report[name] = {"bubble_theory": bubble_fraction(p, m), **_measured_bubble(info, ours, tokens, targets)}

    def sync():
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    timing = interleaved(runners, rounds=args.rounds, reps=args.reps, warmup=2, device="cpu", sync=sync)
    summary = {"p": p, "m": m}
    for name in ("gpipe", "1f1b"):
        ratio = timing.ratio(f"torch {name}", f"ours {name}")
        bubble = report[name]
        error = abs(bubble["bubble_measured"] - bubble["bubble_theory"]) / bubble["bubble_theory"] if p > 1 else 0.0
        summary[name] = {"ours_ms": str(timing.time(f"ours {name}")), "torch_ms": str(timing.time(f"torch {name}")),
                         "throughput_vs_torch": str(ratio), "verdict": ratio.verdict(at_least=TP_TARGET),
                         "bubble_measured": bubble["bubble_measured"], "bubble_theory": bubble["bubble_theory"],
                         "bubble_relative_error": error,
                         "bubble_verdict": "met" if error <= BUBBLE_TOLERANCE else "missed"}
    if info.is_main:
        print(f"pipeline, p = {p}, m = {m}:\n{timing.table(baseline='torch 1f1b')}")
    return {"timing": timing.as_dict(), "report": report, "summary": summary}


def _measured_bubble(info, runtime: PipelineRuntime, tokens, targets, repeats: int = 3) -> dict:
    """1 - (busy time of all ranks) / (p x makespan), from the runtime's timelines (the median of a few steps)."""
    bubbles, timelines = [], None
    for _ in range(repeats):
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        runtime.stage.zero_grad(set_to_none=True)
        runtime.step(tokens, targets)
        mine = [(e.kind, e.microbatch, e.start, e.end) for e in runtime.timeline]
        timelines = [None] * dist.get_world_size()
        dist.all_gather_object(timelines, mine)
        busy = sum(end - start for timeline in timelines for _, _, start, end in timeline)
        makespan = max(timeline[-1][3] for timeline in timelines)
        bubbles.append(1.0 - busy / (len(timelines) * makespan))
    return {"bubble_measured": sorted(bubbles)[len(bubbles) // 2], "timelines": timelines}


# -----------------------------------------------------------------------------
# Report


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    report = results["pipeline"]["report"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, name in zip(axes[:2], ("gpipe", "1f1b")):
        for rank, timeline in enumerate(report[name]["timelines"]):
            for kind, microbatch, start, end in timeline:
                ax.barh(rank, (end - start) * 1e3, left=start * 1e3, color="tab:blue" if kind == "F" else "tab:green",
                        edgecolor="white")
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        ax.set_ylabel("rank")
        ax.set_title(f"ours, {name}: bubble {report[name]['bubble_measured']:.3f} "
                     f"(theory {report[name]['bubble_theory']:.3f})")
    timing = Interleaved(rounds_ms={k: v["values"] for k, v in results["pipeline"]["timing"]["time_ms"].items()},
                         reps=results["pipeline"]["timing"]["reps_per_round"])
    names = list(timing.rounds_ms)
    axes[2].bar(names, [timing.time(n).median for n in names], color="tab:gray")
    axes[2].set_ylabel("step time (ms)")
    axes[2].tick_params(axis="x", rotation=30)
    axes[2].set_title(f"p = {report['num_stages']}, m = {report['num_microbatches']}, "
                      f"{results['environment'].get('gpu') or 'CPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
