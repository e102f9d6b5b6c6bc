"""Benchmark (GPU): mixed-precision training steps, and W4A16 decode matmuls against torch's bf16 matmul.

Every figure comes from `common.bench.interleaved`: the variants of one comparison run interleaved (A B C, B C A, ...)
over several rounds after a warm-up of each; each time is the median of the round medians with its min-max spread,
each ratio is taken per round, and a target is "met" only when the whole spread of the ratio clears it.

Part 1, a GPT-2-small-size training step (common.model preset "gpt2", B8 N1024, fused AdamW):
    ours fp32, tf32, bf16 autocast, fp16 autocast + this lab's DynamicLossScaler, an fp16 model behind
    MasterWeightOptimizer; peers: torch fp16 autocast + torch.amp.GradScaler, and HF transformers' GPT-2 in fp32 and
    bf16. Target (docs/performance.md): bf16 at least 3x faster than fp32.

Part 2, decode-like matmuls y = x W^T, x (M, K) bf16, M = 1..16, K = N = 4096 and 8192, int4 in groups of 128 and
NF4 in blocks of 64 (its scales dequantized once, at load time):
    bf16 matmul             torch, W in bf16: the time to beat
    deq+mm                  dequantize-then-matmul in eager PyTorch (int4_dequantize, then x @ W'^T)
    compile(deq+mm)         the same function under torch.compile: the peer a user would reach for
    tiled int4 / nf4        w4a16.w4a16_matmul, the lab's (graded, teachable) tl.dot kernel
    gemv int4 / nf4         w4a16_gemv.w4a16_fast, the reference's fast path (split-K GEMV over a pre-shuffled layout
                            for M <= 4; it hands larger M to the tiled kernel)
    Each timed call walks through weight copies that together exceed the L2 (as a decode step walks through its
    layers), `--calls` calls per timing, captured in a CUDA graph so that host launch overhead does not count
    (`--eager` times plain calls instead). Bandwidth is the bytes that must move (weights, scales, x, y) per second.
    Targets (issue 18): gemv int4 at most 0.4x the bf16 matmul's time at M = 1, at most 1.0x for M = 2..16; gemv
    NF4 at most 0.5x at M = 1. `--sweep` also times a grid of GEMV tiles at M = 1 (the record behind
    default_gemv_config).

Correctness comes first: every kernel and the compiled peer are compared with float64 dequantize-then-matmul, and
the scaler's trajectory with GradScaler's, before anything is timed.

    PYTHONPATH=reference:labs python -m lab02_numerics.benchmark --out results/          # GPU
    PYTHONPATH=reference:labs python -m lab02_numerics.benchmark --smoke                 # CPU, seconds: the wiring
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from common.bench import Spread, environment, interleaved

L2_ROTATION_BYTES = 256 * 2**20  # weights in rotation per timed call: past the H200's 60 MB of L2, and the H100's 50
W4A16_TARGETS = {  # variant -> (M values, at most this fraction of the bf16 matmul's time)
    "gemv int4 (M=1)": ("gemv int4", (1,), 0.4),
    "gemv int4 (M=2..16)": ("gemv int4", (2, 4, 8, 16), 1.0),
    "gemv nf4 (M=1)": ("gemv nf4", (1,), 0.5),
}


# -----------------------------------------------------------------------------
# Correctness


def check_kernels(device: torch.device, shapes: list[tuple[int, int, int]], compiled) -> float:
    """Worst error of every W4A16 path against float64 dequantize-then-matmul, relative to max|y|."""
    from .nf4 import NF4Config, dequantize_nf4, quantize_nf4
    from .quantize import int4_dequantize, int4_quantize
    from .w4a16 import w4a16_matmul
    from .w4a16_gemv import prepare_w4a16, w4a16_fast

    worst = 0.0
    for M, N, K in shapes:
        w = torch.randn(N, K, device=device) * 0.02
        x = torch.randn(M, K, device=device).to(torch.bfloat16)
        int4 = int4_quantize(w, group_size=128)
        nf4 = quantize_nf4(w, config=NF4Config(block_size=64))
        for name, weight, w_hat in (("int4", int4, int4_dequantize(int4)), ("nf4", nf4, dequantize_nf4(nf4))):
            expected = x.double() @ w_hat.to(torch.bfloat16).double().t()
            results = {"tiled": w4a16_matmul(x, weight), "gemv": w4a16_fast(x, prepare_w4a16(weight))}
            if name == "int4" and compiled is not None:
                results["compile(deq+mm)"] = compiled(x, int4.packed, int4.scales)
            for path, y in results.items():
                error = ((y.double() - expected).abs().max() / expected.abs().max()).item()
                worst = max(worst, error)
                if error > 1e-2:
                    raise RuntimeError(f"{path} {name} is wrong at M={M} N={N} K={K}: relative error {error:.2e}")
    return worst


def check_scaler(device: torch.device) -> None:
    """Our scaler and GradScaler on a forced overflow pattern: identical scale trajectories."""
    from .loss_scaler import DynamicLossScaler

    trajectories = []
    for scaler in (DynamicLossScaler(), torch.amp.GradScaler(device.type)):
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


def training_variants(device: torch.device, config, batch_size: int, seq_len: int, *, hf_layers: int | None) -> dict:
    """name -> (step function, parameter count); every variant owns its model and optimizer."""
    from common.model import Transformer

    from .loss_scaler import DynamicLossScaler
    from .master_weights import MasterWeightOptimizer, train_step

    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)
    fused = device.type == "cuda"
    variants = {}

    def ours(precision: str):
        torch.manual_seed(0)
        model = Transformer(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        scaler = DynamicLossScaler() if precision == "fp16" else None
        return (lambda: train_step(model, tokens, tokens, optimizer, precision=precision, scaler=scaler),
                model.num_params())

    for precision in ("fp32", "tf32", "bf16", "fp16"):
        variants[f"ours {precision}" + (" + our scaler" if precision == "fp16" else "")] = ours(precision)

    torch.manual_seed(0)
    peer_model = Transformer(config).to(device)
    peer_optimizer = torch.optim.AdamW(peer_model.parameters(), lr=1e-4, fused=fused)
    grad_scaler = torch.amp.GradScaler(device.type)

    def torch_gradscaler():
        peer_optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16):
            loss = peer_model.loss(tokens, tokens)
        grad_scaler.scale(loss).backward()
        grad_scaler.step(peer_optimizer)
        grad_scaler.update()

    variants["torch fp16 + GradScaler (peer)"] = (torch_gradscaler, peer_model.num_params())

    torch.manual_seed(0)
    half_model = Transformer(config).to(device).half()
    masters = MasterWeightOptimizer(half_model, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=fused),
                                    scaler=DynamicLossScaler())

    def master_weights():
        masters.zero_grad()
        masters.scaler.scale(half_model.loss(tokens, tokens)).backward()
        masters.step()

    variants["fp16 model + fp32 masters"] = (master_weights, half_model.num_params())
    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        for precision in ("fp32", "bf16"):
            hf_config = GPT2Config(n_positions=seq_len, attn_implementation="sdpa",
                                   **({"n_layer": hf_layers, "n_embd": 64, "n_head": 4} if hf_layers else {}))
            torch.manual_seed(0)
            hf = GPT2LMHeadModel(hf_config).to(device)
            hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=fused)
            hf_tokens = tokens % hf.config.vocab_size

            def hf_step(hf=hf, hf_optimizer=hf_optimizer, hf_tokens=hf_tokens, precision=precision):
                hf_optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = hf(input_ids=hf_tokens, labels=hf_tokens).loss
                loss.backward()
                hf_optimizer.step()

            variants[f"HF GPT-2 {precision} (peer)"] = (hf_step, sum(p.numel() for p in hf.parameters()))
    except Exception as error:  # the peer is context, not the measurement: report and go on
        print(f"  HF GPT-2 peer skipped: {type(error).__name__}: {error}")
    return variants


def bench_training(device: torch.device, *, preset: str, batch_size: int, seq_len: int, rounds: int, reps: int,
                   hf_layers: int | None = None) -> dict:
    from common.measure import cuda_peak_memory, transformer_train_flops
    from common.model import ModelConfig

    config = ModelConfig.preset(preset, max_seq_len=seq_len)
    variants = training_variants(device, config, batch_size, seq_len, hf_layers=hf_layers)
    peaks = {}
    for name, (step, _) in variants.items():
        step()  # optimizer state and gradients allocated outside any measurement
        if device.type == "cuda":
            peaks[name] = cuda_peak_memory(step)
    print(f"\nPart 1: {preset} training step, B{batch_size} N{seq_len}, AdamW; {rounds} interleaved rounds of {reps}")
    result = interleaved({name: step for name, (step, _) in variants.items()}, rounds=rounds, reps=reps, warmup=1,
                         device=device)
    print(result.table(baseline="ours fp32"))
    rows = {}
    for name, (_, num_params) in variants.items():
        time = result.time(name)
        rows[name] = {"step_ms": time.as_dict(),
                      "speedup_vs_ours_fp32": _inverse(result.ratio(name, "ours fp32")).as_dict(),
                      "model_tflops": transformer_train_flops(num_params, batch_size * seq_len) / time.median / 1e9,
                      "cuda_peak_bytes": peaks.get(name)}
    speedup = _inverse(result.ratio("ours bf16", "ours fp32"))
    verdict = speedup.verdict(at_least=3.0)
    print(f"  bf16 autocast vs fp32: {speedup}x (target >= 3x over the whole spread: {verdict})")
    peer = {}
    if "HF GPT-2 bf16 (peer)" in variants:
        hf = _inverse(result.ratio("HF GPT-2 bf16 (peer)", "HF GPT-2 fp32 (peer)"))
        peer = {"hf_bf16_speedup": hf.as_dict()}
        print(f"  HF GPT-2 bf16 vs its fp32: {hf}x")
    return {"shape": {"preset": preset, "batch_size": batch_size, "seq_len": seq_len,
                      "params": variants["ours fp32"][1]},
            "timing": result.as_dict(), "rows": rows, "peer": peer, "bf16_speedup": speedup.as_dict(),
            "target": {"bf16_speedup_at_least": 3.0, "verdict": verdict}}


def _inverse(spread: Spread) -> Spread:
    """A time ratio turned into a speedup (1 / ratio), per round."""
    return Spread.of([1.0 / value for value in spread.values])


# -----------------------------------------------------------------------------
# Part 2: W4A16 at decode shapes


def naive_dequant_matmul(group_size: int, shape: tuple[int, int]):
    """x @ int4_dequantize(W)^T as a function of plain tensors (what torch.compile is given)."""
    from .quantize import Int4Weight, int4_dequantize

    def naive(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        weight = Int4Weight(packed=packed, scales=scales, group_size=group_size, shape=shape)
        return x @ int4_dequantize(weight, dtype=x.dtype).t()

    return naive


def compile_naive(group_size: int, shape: tuple[int, int], *, backend: str):
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # one compiled graph per M: never fall back to eager
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    return torch.compile(naive_dequant_matmul(group_size, shape), dynamic=False, backend=backend)


def _copies(make, count: int) -> list:
    return [make() for _ in range(max(1, count))]


def w4a16_variants(x: torch.Tensor, weights: dict, compiled, calls: int) -> dict:
    """name -> a no-argument function making `calls` calls, each on the next weight copy."""
    from .w4a16 import w4a16_matmul
    from .w4a16_gemv import w4a16_fast

    naive = naive_dequant_matmul(weights["int4"][0].group_size, weights["int4"][0].shape)

    def cycle(call, copies):
        def run():
            for index in range(calls):
                call(copies[index % len(copies)])
        return run

    variants = {"bf16 matmul": cycle(lambda w: x @ w.t(), weights["bf16"]),
                "deq+mm": cycle(lambda w: naive(x, w.packed, w.scales), weights["int4"])}
    if compiled is not None:
        variants["compile(deq+mm)"] = cycle(lambda w: compiled(x, w.packed, w.scales), weights["int4"])
    variants.update({"tiled int4": cycle(lambda w: w4a16_matmul(x, w), weights["int4"]),
                     "tiled nf4": cycle(lambda w: w4a16_matmul(x, w), weights["nf4"]),
                     "gemv int4": cycle(lambda w: w4a16_fast(x, w), weights["gemv int4"]),
                     "gemv nf4": cycle(lambda w: w4a16_fast(x, w), weights["gemv nf4"])})
    return variants


def graphed(variants: dict, device: torch.device) -> tuple[dict, dict]:
    """Each variant captured in a CUDA graph (replayed to time it); variants that cannot be captured stay eager."""
    timed, modes = {}, {}
    for name, run in variants.items():
        run()  # compile, autotune and allocate outside the capture
        torch.cuda.synchronize(device)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            timed[name], modes[name] = graph.replay, "CUDA graph"
        except Exception as error:  # e.g. a host sync inside: time it eagerly, and say so
            torch.cuda.synchronize(device)
            timed[name], modes[name] = run, f"eager ({type(error).__name__} under capture)"
    return timed, modes


def prepare_weights(w: torch.Tensor, *, int4_group: int, nf4_block: int, rotation_bytes: int) -> dict:
    """Every format of one weight, with enough copies of each to exceed `rotation_bytes` together."""
    from .nf4 import NF4Config, quantize_nf4
    from .quantize import int4_quantize
    from .w4a16_gemv import prepare_w4a16

    N, K = w.shape
    int4 = int4_quantize(w, group_size=int4_group)
    nf4 = quantize_nf4(w, config=NF4Config(block_size=nf4_block))
    nf4 = dataclasses.replace(nf4, scales=nf4.block_scales())  # scales dequantized once, at load time
    bf16 = w.to(torch.bfloat16)
    int4_count = rotation_bytes // int4.nbytes()
    nf4_count = rotation_bytes // (nf4.packed.numel() + 4 * nf4.scales.numel())
    int4_copies = [int4] + _copies(lambda: dataclasses.replace(int4, packed=int4.packed.clone(),
                                                               scales=int4.scales.clone()), int4_count - 1)
    nf4_copies = [nf4] + _copies(lambda: dataclasses.replace(nf4, packed=nf4.packed.clone(),
                                                             scales=nf4.scales.clone()), nf4_count - 1)
    return {"bf16": [bf16] + _copies(bf16.clone, rotation_bytes // (2 * N * K) - 1),
            "int4": int4_copies, "nf4": nf4_copies,
            "gemv int4": [prepare_w4a16(q) for q in int4_copies], "gemv nf4": [prepare_w4a16(q) for q in nf4_copies]}


def moved_bytes(name: str, weights: dict, M: int, N: int, K: int) -> int:
    """Bytes a variant must move per call: its weight format, plus x and y in bf16."""
    io = 2 * M * K + 2 * M * N
    if name == "bf16 matmul":
        return 2 * N * K + io
    if "nf4" in name:
        nf4 = weights["nf4"][0]
        return nf4.packed.numel() + 4 * nf4.scales.numel() + io
    return weights["int4"][0].nbytes() + io


def bench_w4a16(device: torch.device, sizes: list[int], ms: list[int], *, rounds: int, reps: int, warmup: int,
                calls: int, eager: bool, compile_backend: str | None, rotation_bytes: int) -> dict:
    print(f"\nPart 2: y = x W^T, x (M, K) bf16; microseconds per call ({calls} calls per timing over weight copies "
          f"past the L2{'' if eager or device.type != 'cuda' else ', CUDA graphs'}); {rounds} interleaved rounds")
    rows, modes = [], {}
    for size in sizes:
        N = K = size
        w = torch.randn(N, K, device=device) * 0.02
        weights = prepare_weights(w, int4_group=128, nf4_block=64, rotation_bytes=rotation_bytes)
        compiled = None
        if compile_backend is not None:
            compiled = compile_naive(128, (N, K), backend=compile_backend)
        for M in ms:
            x = torch.randn(M, K, device=device).to(torch.bfloat16)
            variants = w4a16_variants(x, weights, compiled, calls)
            if device.type == "cuda" and not eager:
                variants, modes[f"{size}/{M}"] = graphed(variants, device)
            result = interleaved(variants, rounds=rounds, reps=reps, warmup=warmup, device=device)
            row = {"K": K, "N": N, "M": M, "us": {}, "vs_bf16": {}, "gbs": {}}
            for name in variants:
                time = result.time(name)
                us = Spread.of([1e3 * t / calls for t in time.values])
                row["us"][name] = us.as_dict()
                row["gbs"][name] = moved_bytes(name, weights, M, N, K) / us.median / 1e3
                if name != "bf16 matmul":
                    row["vs_bf16"][name] = result.ratio(name, "bf16 matmul").as_dict()
            rows.append(row)
            print(f"  K=N={size} M={M}")
            for name in variants:
                us = row["us"][name]
                ratio = row["vs_bf16"].get(name)
                print(f"    {name:<16} {us['median']:9.2f} us [{us['low']:.2f}-{us['high']:.2f}]  "
                      f"{row['gbs'][name]:8.1f} GB/s" + (f"   {ratio['median']:.3f}x bf16's time "
                                                        f"[{ratio['low']:.3f}-{ratio['high']:.3f}]" if ratio else ""),
                      flush=True)
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    verdicts = {}
    for target, (variant, target_ms, at_most) in W4A16_TARGETS.items():
        for row in rows:
            if row["M"] in target_ms and variant in row["vs_bf16"]:
                ratio = row["vs_bf16"][variant]
                spread = Spread(ratio["median"], ratio["low"], ratio["high"], tuple(ratio["values"]))
                verdicts[f"{target} K=N={row['K']} M={row['M']}"] = {
                    "at_most": at_most, "ratio": ratio, "verdict": spread.verdict(at_most=at_most)}
    for name, verdict in verdicts.items():
        ratio = verdict["ratio"]
        print(f"  target {name}: {ratio['median']:.3f}x [{ratio['low']:.3f}-{ratio['high']:.3f}] of bf16's time, "
              f"at most {verdict['at_most']}: {verdict['verdict']}")
    return {"rows": rows, "capture": modes, "targets": verdicts}


def sweep_gemv(device: torch.device, sizes: list[int], *, rounds: int, reps: int, calls: int,
               rotation_bytes: int) -> list[dict]:
    """gemv int4 at M = 1 over a grid of tiles, interleaved (a record that justifies default_gemv_config)."""
    from .w4a16_gemv import GemvConfig, default_gemv_config, w4a16_fast

    records = []
    for size in sizes:
        weights = prepare_weights(torch.randn(size, size, device=device) * 0.02, int4_group=128, nf4_block=64,
                                  rotation_bytes=rotation_bytes)
        copies = weights["gemv int4"]
        x = torch.randn(1, size, device=device).to(torch.bfloat16)
        configs = {f"block_n={bn} split_k={sk}": GemvConfig(block_n=bn, split_k=sk)
                   for bn in (64, 128, 256, 512) for sk in (4, 8, 16, 32, 64) if (size // 128) % sk == 0}

        def cycle(config):
            def run():
                for index in range(calls):
                    w4a16_fast(x, copies[index % len(copies)], config=config)
            return run

        variants = {name: cycle(config) for name, config in configs.items()}
        if device.type == "cuda":
            variants, _ = graphed(variants, device)
        result = interleaved(variants, rounds=rounds, reps=reps, warmup=1, device=device)
        for name, config in configs.items():
            records.append({"K": size, **dataclasses.asdict(config),
                            "us": Spread.of([1e3 * t / calls for t in result.time(name).values]).as_dict()})
        best = min((r for r in records if r["K"] == size), key=lambda r: r["us"]["median"])
        chosen = dataclasses.asdict(default_gemv_config(1, size, size, 128, device))
        print(f"  gemv sweep K=N={size}, M=1: best block_n={best['block_n']} split_k={best['split_k']} "
              f"{best['us']['median']:.2f} us; default_gemv_config {chosen}", flush=True)
    return records


# -----------------------------------------------------------------------------
# Main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the spread's sample)")
    parser.add_argument("--calls", type=int, default=50, help="W4A16 calls per timing (cycling weight copies)")
    parser.add_argument("--eager", action="store_true", help="time W4A16 calls eagerly, not in CUDA graphs")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of GEMV tiles at M = 1")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds: checks the wiring only")
    parser.add_argument("--out", type=Path, default=None, help="directory for lab02_benchmark.json and .png")
    args = parser.parse_args()
    if args.smoke:
        # before any kernel is defined (the lab's modules are imported below): no GPU, so the interpreter
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        settings = dict(sizes=[128], ms=[1, 3], rounds=2, calls=1, reps=1, warmup=0, preset="tiny", batch_size=2,
                        seq_len=32, hf_layers=1, compile_backend="eager" if device.type == "cpu" else "inductor",
                        rotation_bytes=2**14, check_shapes=[(1, 32, 128), (5, 20, 128)])
    else:
        from common.measure import require_cuda

        device = require_cuda("lab02_numerics.benchmark")
        settings = dict(sizes=args.sizes, ms=args.ms, rounds=args.rounds, calls=args.calls, reps=5, warmup=2,
                        preset="gpt2", batch_size=args.batch_size, seq_len=args.seq_len, hf_layers=None,
                        compile_backend="inductor", rotation_bytes=L2_ROTATION_BYTES,
                        check_shapes=[(1, 4096, 4096), (16, 8192, 8192), (7, 1000, 2048)])
    torch.manual_seed(0)
    try:  # the compiled peer is checked on the first shape; if torch.compile fails, the benchmark goes on without it
        _, N, K = settings["check_shapes"][0]
        error = check_kernels(device, settings["check_shapes"][:1],
                              compile_naive(128, (N, K), backend=settings["compile_backend"]))
    except Exception as failure:
        if "compile" not in type(failure).__module__ and "dynamo" not in type(failure).__module__ and \
                "inductor" not in type(failure).__module__:
            raise
        print(f"  torch.compile peer skipped: {type(failure).__name__}: {str(failure)[:300]}")
        settings["compile_backend"] = None
        error = check_kernels(device, settings["check_shapes"][:1], None)
    error = max(error, check_kernels(device, settings["check_shapes"][1:], None))
    check_scaler(device)
    print(f"correctness: tiled and GEMV W4A16 (int4, NF4) and compile(deq+mm) match float64 dequantize-then-matmul "
          f"(worst error {error:.1e} of max|y|); the scaler follows GradScaler's trajectory on {device.type}")
    result = {"benchmark": "lab02_numerics.benchmark", "environment": environment(), "smoke": args.smoke,
              "method": "common.bench.interleaved: round medians, min-max spreads, verdicts on the whole spread",
              "kernel_check_max_relative_error": error}
    if args.sweep:
        result["gemv_sweep"] = sweep_gemv(device, settings["sizes"], rounds=settings["rounds"], reps=settings["reps"],
                                          calls=settings["calls"], rotation_bytes=settings["rotation_bytes"])
    result["w4a16"] = bench_w4a16(device, settings["sizes"], settings["ms"], rounds=settings["rounds"],
                                  reps=settings["reps"], warmup=settings["warmup"], calls=settings["calls"],
                                  eager=args.eager,
                                  compile_backend=settings["compile_backend"],
                                  rotation_bytes=settings["rotation_bytes"])
    if not args.skip_training:
        result["training"] = bench_training(device, preset=settings["preset"], batch_size=settings["batch_size"],
                                            seq_len=settings["seq_len"], rounds=max(3, settings["rounds"] - 2),
                                            reps=1 if args.smoke else 3, hf_layers=settings["hf_layers"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lab02_benchmark.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "lab02_benchmark.png")
        print(f"wrote {args.out / 'lab02_benchmark.json'} and lab02_benchmark.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["K"] for r in result["w4a16"]["rows"]})
    fig, axes = plt.subplots(1, len(sizes) + ("training" in result), figsize=(5 * (len(sizes) + 1), 4),
                             squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = [r for r in result["w4a16"]["rows"] if r["K"] == size]
        for name in rows[0]["us"]:
            medians = [r["us"][name]["median"] for r in rows]
            lows = [r["us"][name]["low"] for r in rows]
            highs = [r["us"][name]["high"] for r in rows]
            ms = [r["M"] for r in rows]
            ax.plot(ms, medians, marker="o", label=name)
            ax.fill_between(ms, lows, highs, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("us per call (spread shaded)")
        ax.set_title(f"W4A16, K = N = {size}")
        ax.legend(fontsize=7)
    if "training" in result:
        ax = axes[0][-1]
        rows = result["training"]["rows"]
        names = list(rows)
        medians = [rows[n]["speedup_vs_ours_fp32"]["median"] for n in names]
        errors = [[m - rows[n]["speedup_vs_ours_fp32"]["low"] for n, m in zip(names, medians)],
                  [rows[n]["speedup_vs_ours_fp32"]["high"] - m for n, m in zip(names, medians)]]
        ax.bar(names, medians, yerr=errors, color="#4C72B0")
        ax.axhline(3.0, color="red", linestyle="--", label="target: bf16 >= 3x fp32")
        ax.set_ylabel("speedup over our fp32 step")
        ax.set_title("training step")
        ax.tick_params(axis="x", rotation=70, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
