"""Benchmark (GPU): mixed-precision training steps, and the W4A16 kernel against torch's bf16 matmul.

Part 1, a GPT-2-small-size training step (common.model preset "gpt2", B8 N1024, fused AdamW), in one process:
    fp32, tf32, bf16 autocast, fp16 autocast + this lab's DynamicLossScaler (and torch.amp.GradScaler as its peer),
    and an fp16 model behind MasterWeightOptimizer; the peer ratio is HF transformers' GPT-2 in fp32 and bf16.
    Target (PERFORMANCE.md): bf16 at least 3x faster than fp32 (HF GPT-2's bf16 is 3.4x its fp32).

Part 2, decode-like matmuls y = x W^T, x (M, K) bf16 with M = 1..16, K = N = 4096 and 8192:
    torch bf16 matmul (W in bf16), dequantize-then-matmul (int4 -> bf16 W, then matmul), and w4a16_matmul on int4
    (group 128) and NF4 (block 64; scales dequantized once at load time). Timed with triton.testing.do_bench (median,
    L2 flushed before every run), reported as time, ratio to the bf16 matmul, and achieved GB/s of bytes that must move
    (weights + scales + x + y) against the H100's 2939 GB/s device-copy ceiling.
    Target: w4a16 at least 2x faster than the bf16 matmul at M = 1. A small sweep of tile configs at M = 1 is
    recorded too, so the fixed tiles of `default_config` can be justified by measurement.

Correctness comes first: the kernel is compared with float64 dequantize-then-matmul on fresh random inputs, and the
scaler's trajectory with GradScaler's on CUDA, before anything is timed.

    PYTHONPATH=reference:labs python -m lab02_numerics.benchmark --out results/
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch

from common.measure import cuda_peak_memory, require_cuda, time_fn, transformer_train_flops
from common.model import ModelConfig, Transformer

from .loss_scaler import DynamicLossScaler
from .master_weights import MasterWeightOptimizer, train_step
from .nf4 import NF4Config, dequantize_nf4, quantize_nf4
from .quantize import int4_dequantize, int4_quantize
from .w4a16 import W4A16Config, default_config, w4a16_matmul

COPY_CEILING_GBS = 2939.0  # H100 80GB HBM3 device-to-device copy (PERFORMANCE.md)


# -----------------------------------------------------------------------------
# Correctness


def check_kernel(device: torch.device) -> float:
    """Worst error of w4a16_matmul against float64 dequantize-then-matmul, relative to max|y|, over a few shapes."""
    worst = 0.0
    for M, N, K in [(1, 4096, 4096), (16, 8192, 8192), (7, 1000, 2048)]:
        w = torch.randn(N, K, device=device) * 0.02
        x = torch.randn(M, K, device=device).to(torch.bfloat16)
        for weight, w_hat in ((q := int4_quantize(w, group_size=128), int4_dequantize(q)),
                              (q2 := quantize_nf4(w, config=NF4Config(block_size=64)), dequantize_nf4(q2))):
            expected = x.double() @ w_hat.to(torch.bfloat16).double().t()
            error = ((w4a16_matmul(x, weight).double() - expected).abs().max() / expected.abs().max()).item()
            worst = max(worst, error)
            if error > 1e-2:
                raise RuntimeError(f"w4a16_matmul is wrong at M={M} N={N} K={K}: relative error {error:.2e}")
    return worst


def check_scaler(device: torch.device) -> None:
    """Our scaler and GradScaler on a forced overflow pattern: identical scale trajectories on CUDA."""
    trajectories = []
    for scaler in (DynamicLossScaler(), torch.amp.GradScaler("cuda")):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(64, device=device))
        optimizer = torch.optim.SGD([param], lr=0.1)
        scales = []
        for step in range(12):
            optimizer.zero_grad()
            scaler.scale(param.pow(2).sum()).backward()
            if step in (2, 3, 7):
                param.grad[0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            scales.append(float(scaler.get_scale()))
        trajectories.append(scales)
    if trajectories[0] != trajectories[1]:
        raise RuntimeError(f"scale trajectories differ: ours {trajectories[0]}, GradScaler {trajectories[1]}")


# -----------------------------------------------------------------------------
# Part 1: the training step


def bench_training(device: torch.device, batch_size: int, seq_len: int, repeats: int) -> dict:
    config = ModelConfig.preset("gpt2", max_seq_len=seq_len)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    rows = {}

    def run(name: str, make_step) -> None:
        torch.manual_seed(0)
        step, num_params = make_step()
        step()  # warm-up: optimizer state and gradients allocated outside the measurement
        peak = cuda_peak_memory(step)
        timing = time_fn(step, warmup=2, repeats=repeats, device="cuda")
        flops = transformer_train_flops(num_params, batch_size * seq_len)
        rows[name] = {"step_ms": timing.median_ms, "tokens_per_s": batch_size * seq_len / timing.median_ms * 1e3,
                      "model_tflops": flops / timing.median_ms / 1e9, "cuda_peak_bytes": peak}
        print(f"  {name:>28}: {timing.median_ms:8.1f} ms  {rows[name]['model_tflops']:6.1f} TFLOP/s  "
              f"peak {peak / 2**30:5.1f} GiB", flush=True)
        torch.cuda.empty_cache()

    def ours(precision: str):
        def make():
            model = Transformer(config).to(device)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            scaler = DynamicLossScaler() if precision == "fp16" else None
            return (lambda: train_step(model, tokens, tokens, optimizer, precision=precision, scaler=scaler),
                    model.num_params())
        return make

    def torch_gradscaler():
        model = Transformer(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        scaler = torch.amp.GradScaler("cuda")

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model.loss(tokens, tokens)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return step, model.num_params()

    def master_weights():
        model = Transformer(config).to(device).half()
        opt = MasterWeightOptimizer(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
                                    scaler=DynamicLossScaler())

        def step():
            opt.zero_grad()
            opt.scaler.scale(model.loss(tokens, tokens)).backward()
            opt.step()
        return step, model.num_params()

    print(f"\nPart 1: GPT-2-small-size training step, B{batch_size} N{seq_len}, fused AdamW")
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        run(f"ours {precision}" + (" + loss scaler" if precision == "fp16" else ""), ours(precision))
    run("torch fp16 + GradScaler", torch_gradscaler)
    run("fp16 model + fp32 masters", master_weights)
    peer = {}
    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        for precision in ("fp32", "bf16"):
            def make(precision=precision):
                model = GPT2LMHeadModel(GPT2Config(n_positions=seq_len, attn_implementation="sdpa")).to(device)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                hf_tokens = tokens % model.config.vocab_size

                def step():
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        loss = model(input_ids=hf_tokens, labels=hf_tokens).loss
                    loss.backward()
                    optimizer.step()
                return step, sum(p.numel() for p in model.parameters())
            run(f"HF GPT-2 {precision}", make)
        peer = {"hf_bf16_speedup": rows["HF GPT-2 fp32"]["step_ms"] / rows["HF GPT-2 bf16"]["step_ms"]}
    except Exception as error:  # the peer is context, not the measurement: report and go on
        print(f"  HF GPT-2 peer skipped: {type(error).__name__}: {error}")
    base = rows["ours fp32"]["step_ms"]
    for row in rows.values():
        row["speedup_vs_ours_fp32"] = base / row["step_ms"]
    speedup = rows["ours bf16"]["speedup_vs_ours_fp32"]
    print(f"  bf16 autocast is {speedup:.2f}x fp32 (target >= 3x: {'met' if speedup >= 3 else 'missed'})"
          + (f"; HF GPT-2 bf16 is {peer['hf_bf16_speedup']:.2f}x its fp32" if peer else ""))
    return {"rows": rows, "peer": peer, "bf16_speedup": speedup, "target_met": speedup >= 3.0}


# -----------------------------------------------------------------------------
# Part 2: W4A16 at decode shapes


def graph_time_us(make_fn, copies: int, calls: int = 60) -> float:
    """Per-call microseconds from a CUDA graph of `calls` calls cycling over `copies` weight copies.

    The graph removes the host's launch overhead; cycling over copies whose total exceeds the 50 MB L2 keeps the
    weights coming from HBM, as they do when a decode step walks through many layers.
    """
    fns = [make_fn(i) for i in range(copies)]
    for fn in fns:
        fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            fns[j % copies]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def bench_w4a16(device: torch.device, sizes: list[int], ms: list[int],
                best_tiles: dict[int, W4A16Config] | None = None) -> dict:
    from triton.testing import do_bench

    def bench(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # microseconds

    rows = []
    print("\nPart 2: y = x W^T, x (M, K) bf16; microseconds (do_bench, L2 flushed | CUDA graph, weights rotated "
          "past L2); GB/s of bytes that must move")
    print(f"{'K=N':>6} {'M':>3} {'bf16 mm':>9} {'deq+mm':>9} {'int4':>8} {'nf4':>8} {'int4/bf16':>10} "
          f"{'graph bf16':>11} {'graph int4':>11} {'graph x':>8} {'bf16 GB/s':>10} {'int4 GB/s':>10}")
    for size in sizes:
        N = K = size
        w = torch.randn(N, K, device=device) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        int4 = int4_quantize(w, group_size=128)
        nf4 = quantize_nf4(w, config=NF4Config(block_size=64))
        nf4 = dataclasses.replace(nf4, scales=nf4.block_scales())  # scales dequantized once, at load time
        # copies for the graph timing: at least 128 MB of each format in rotation (2.5x the L2)
        bf16_copies = [w_bf16] + [w_bf16.clone() for _ in range(max(1, -(-2**27 // (2 * N * K))) - 1)]
        int4_copies = [int4] + [dataclasses.replace(int4, packed=int4.packed.clone(), scales=int4.scales.clone())
                                for _ in range(max(1, -(-2**27 // int4.nbytes())) - 1)]
        for M in ms:
            x = torch.randn(M, K, device=device).to(torch.bfloat16)
            io_bytes = 2 * M * K + 2 * M * N
            t_bf16 = bench(lambda: x @ w_bf16.t())
            t_deq = bench(lambda: x @ int4_dequantize(int4, dtype=torch.bfloat16).t())
            t_int4 = bench(lambda: w4a16_matmul(x, int4))
            t_nf4 = bench(lambda: w4a16_matmul(x, nf4))
            g_bf16 = graph_time_us(lambda i: (lambda: x @ bf16_copies[i].t()), len(bf16_copies))
            g_int4 = graph_time_us(lambda i: (lambda: w4a16_matmul(x, int4_copies[i])), len(int4_copies))
            best = (best_tiles or {}).get(size)
            t_best = bench(lambda: w4a16_matmul(x, int4, config=best)) if best else None
            bytes_bf16 = 2 * N * K + io_bytes
            bytes_int4 = int4.nbytes() + io_bytes
            bytes_nf4 = nf4.packed.numel() + 4 * nf4.scales.numel() + io_bytes
            row = {"K": K, "N": N, "M": M, "bf16_matmul_us": t_bf16, "dequant_then_matmul_us": t_deq,
                   "w4a16_int4_us": t_int4, "w4a16_nf4_us": t_nf4,
                   "int4_speedup_vs_bf16": t_bf16 / t_int4, "nf4_speedup_vs_bf16": t_bf16 / t_nf4,
                   "int4_speedup_vs_dequant": t_deq / t_int4,
                   "graph_bf16_us": g_bf16, "graph_int4_us": g_int4, "graph_int4_speedup_vs_bf16": g_bf16 / g_int4,
                   "bf16_gbs": bytes_bf16 / t_bf16 / 1e3, "int4_gbs": bytes_int4 / t_int4 / 1e3,
                   "nf4_gbs": bytes_nf4 / t_nf4 / 1e3, "graph_bf16_gbs": bytes_bf16 / g_bf16 / 1e3,
                   "graph_int4_gbs": bytes_int4 / g_int4 / 1e3,
                   "config": dataclasses.asdict(default_config(M, N, K, 128)),
                   "best_sweep_tile_int4_us": t_best, "best_sweep_tile": dataclasses.asdict(best) if best else None}
            rows.append(row)
            print(f"{size:6d} {M:3d} {t_bf16:9.1f} {t_deq:9.1f} {t_int4:8.1f} {t_nf4:8.1f} "
                  f"{row['int4_speedup_vs_bf16']:9.2f}x {g_bf16:11.1f} {g_int4:11.1f} "
                  f"{row['graph_int4_speedup_vs_bf16']:7.2f}x {row['bf16_gbs']:10.0f} {row['int4_gbs']:10.0f}"
                  + (f"   best-of-sweep tile {t_best:.1f} us ({t_bf16 / t_best:.2f}x)" if best else ""), flush=True)
        del bf16_copies, int4_copies
        torch.cuda.empty_cache()
    at_m1 = {str(r["K"]): r["int4_speedup_vs_bf16"] for r in rows if r["M"] == 1}
    graph_at_m1 = {str(r["K"]): r["graph_int4_speedup_vs_bf16"] for r in rows if r["M"] == 1}
    met = all(s >= 2.0 for s in at_m1.values())
    print(f"  int4 W4A16 vs bf16 matmul at M=1: do_bench {at_m1}, CUDA graph {graph_at_m1} "
          f"(target >= 2x: {'met' if met else 'missed'}); copy ceiling {COPY_CEILING_GBS:.0f} GB/s")
    return {"rows": rows, "speedup_at_m1": at_m1, "graph_speedup_at_m1": graph_at_m1, "target_met": met}


def sweep_tiles(device: torch.device, sizes: list[int]) -> list[dict]:
    """int4 W4A16 at M = 1 over a small grid of tiles (not autotuning: a record that justifies default_config)."""
    from triton.testing import do_bench

    results = []
    for size in sizes:
        w = torch.randn(size, size, device=device) * 0.02
        int4 = int4_quantize(w, group_size=128)
        x = torch.randn(1, size, device=device).to(torch.bfloat16)
        for block_n in (16, 32, 64):
            for block_k in (128, 256, 512):
                for split_k in (1, 2, 4):
                    for num_warps in (4,):
                        config = W4A16Config(block_n=block_n, block_k=block_k, split_k=split_k,
                                             num_warps=num_warps, num_stages=4)
                        try:
                            t = do_bench(lambda: w4a16_matmul(x, int4, config=config), warmup=10, rep=40,
                                         return_mode="median")
                        except Exception as error:
                            results.append({"K": size, **dataclasses.asdict(config), "error": str(error)[:200]})
                            continue
                        results.append({"K": size, **dataclasses.asdict(config), "us": t * 1e3})
        best = min((r for r in results if r["K"] == size and "us" in r), key=lambda r: r["us"])
        default = dataclasses.asdict(default_config(1, size, size, 128))
        mine = [r for r in results if r["K"] == size and all(r.get(k) == v for k, v in default.items())]
        print(f"  tile sweep K=N={size}, M=1: best {best}; default_config "
              f"{mine[0]['us'] if mine else 'not in the grid'} us", flush=True)
    return results


# -----------------------------------------------------------------------------
# Main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs at M = 1")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="directory for the results JSON and plot")
    args = parser.parse_args()
    device = require_cuda("lab02_numerics.benchmark")
    import triton

    torch.manual_seed(0)
    kernel_error = check_kernel(device)
    check_scaler(device)
    print(f"correctness: w4a16 matches float64 dequantize-then-matmul (worst error {kernel_error:.1e} of max|y|); "
          f"the scaler follows GradScaler's trajectory on CUDA")

    result = {
        "benchmark": "lab02_numerics.benchmark",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kernel_check_max_relative_error": kernel_error,
        "copy_ceiling_gbs": COPY_CEILING_GBS,
    }
    best_tiles = None
    if args.sweep:
        # the sweep runs first, so the table below can show the best M = 1 tile next to default_config's
        result["tile_sweep"] = sweep_tiles(device, args.sizes)
        best_tiles = {}
        for size in args.sizes:
            best = min((r for r in result["tile_sweep"] if r["K"] == size and "us" in r), key=lambda r: r["us"])
            best_tiles[size] = W4A16Config(**{k: best[k] for k in ("block_m", "block_n", "block_k", "split_k",
                                                                    "num_warps", "num_stages")})
    result["w4a16"] = bench_w4a16(device, args.sizes, args.ms, best_tiles)
    if not args.skip_training:
        result["training"] = bench_training(device, args.batch_size, args.seq_len, args.repeats)
        result["training"]["shape"] = {"preset": "gpt2", "batch_size": args.batch_size, "seq_len": args.seq_len,
                                       "params": Transformer(ModelConfig.preset("gpt2")).num_params()}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lab02_benchmark.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "lab02_benchmark.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if "training" in result:
        rows = result["training"]["rows"]
        axes[0].bar(list(rows), [r["speedup_vs_ours_fp32"] for r in rows.values()], color="#4C72B0")
        axes[0].axhline(3.0, color="red", linestyle="--", label="target: bf16 >= 3x fp32")
        axes[0].set_ylabel("speedup over our fp32 step")
        axes[0].set_title("GPT-2-small-size training step")
        axes[0].tick_params(axis="x", rotation=60)
        axes[0].legend()
    for size in sorted({r["K"] for r in result["w4a16"]["rows"]}):
        rows = [r for r in result["w4a16"]["rows"] if r["K"] == size]
        ms = [r["M"] for r in rows]
        axes[1].plot(ms, [r["bf16_matmul_us"] for r in rows], marker="o", label=f"bf16 matmul K=N={size}")
        axes[1].plot(ms, [r["w4a16_int4_us"] for r in rows], marker="s", label=f"w4a16 int4 K=N={size}")
    axes[1].set_xlabel("M (tokens)")
    axes[1].set_ylabel("time (us)")
    axes[1].set_yscale("log")
    axes[1].set_title("decode matmul")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
