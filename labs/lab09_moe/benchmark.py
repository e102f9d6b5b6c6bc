"""Benchmark: the SwiGLU experts on the Triton grouped GEMM against a per-expert loop, torch._grouped_mm and a dense
GEMM pair of equal FLOPs (one GPU, bf16).

    PYTHONPATH=reference:labs python -m lab09_moe.benchmark --out results/          # ~4 minutes on an H200
    PYTHONPATH=reference:labs python -m lab09_moe.benchmark --out results/ --sweep  # + alternative tile sizes
    PYTHONPATH=reference:labs python -m lab09_moe.benchmark --smoke                 # seconds, CPU (interpreter)

Shapes (docs/performance.md): T = 16384 tokens of width C = 2048, routed top-k by a random router (so the slices are
ragged, as in training), for E8 top-2 F5632 (Mixtral's shape) and E64 top-6 F1408 (fine-grained, as DeepSeek-MoE).
Each variant computes y = (silu(x W_gate) * (x W_up)) W_down on the A = k T expert-sorted rows:

    ours          expert_mlp(backend="triton"): two grouped-GEMM launches (and dX, dW kernels in backward)
    loop          expert_mlp(backend="torch"): one cuBLAS matmul per expert and slice
    _grouped_mm   torch._grouped_mm (CUTLASS grouped GEMM), weights in its K-major layout (E, N, K) transposed
    dense pair    one (A, C) @ (C, 2F) GEMM and one (A, F) @ (F, C) GEMM: the same FLOPs with no grouping at all

Correctness first: every variant's output and gradients are compared with an fp32 computation of the same bf16
inputs; ours must be within 2x the error of _grouped_mm (or of the loop, when _grouped_mm is missing) plus 1e-3.
Timing: common.bench.interleaved (rounds in rotating order, CUDA events, medians and their spread). FLOPs of the
SwiGLU experts: forward 6 k T C F (three C x F matrices; docs/performance.md's 2*2*k*T*d*f counts two), backward twice
that. Target: ours at least 0.9x _grouped_mm's throughput, judged on the whole spread of the per-round ratios.

Writes lab09_benchmark.json (with common.bench.environment()) and lab09_benchmark.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = {"E8 top-2 F5632": dict(num_experts=8, top_k=2, ffn_width=5632),
           "E64 top-6 F1408": dict(num_experts=64, top_k=6, ffn_width=1408)}
SMOKE_CONFIGS = {"E4 top-2 F32": dict(num_experts=4, top_k=2, ffn_width=32),
                 "E6 top-3 F16": dict(num_experts=6, top_k=3, ffn_width=16)}
TARGET = 0.9  # ours / _grouped_mm throughput, at least
# tile sizes `--sweep` tries for the forward / dX kernel and for the dW kernel:
# (block_m, block_n, block_k, group_m, num_warps, num_stages)
SWEEP = [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3),
         (64, 256, 64, 8, 4, 4), (128, 256, 64, 4, 8, 4), (128, 128, 32, 8, 4, 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON and the plot")
    parser.add_argument("--tokens", type=int, default=16384, help="T")
    parser.add_argument("--width", type=int, default=2048, help="C")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="also time the tile sizes in SWEEP")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script (tiny shapes, interpreter)")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.width, args.rounds, args.reps = 24, 32, 2, 1
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (imported below)
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (use --smoke to check it on a CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter computes in fp32

    from common.bench import environment

    results = {"benchmark": "lab09_moe.benchmark", "environment": environment(), "tokens": args.tokens,
               "width": args.width, "dtype": str(dtype).removeprefix("torch."), "target": f">= {TARGET}x _grouped_mm",
               "configs": {}}
    for name, config in (SMOKE_CONFIGS if args.smoke else CONFIGS).items():
        problem = make_problem(args.tokens, args.width, **config, dtype=dtype, device=device, seed=0)
        entry = {"config": config, "rows": problem["offsets"][-1].item(),
                 "imbalance": problem["counts"].max().item() / problem["counts"].float().mean().item()}
        fns = variants(problem)
        entry["errors"] = check(problem, fns)
        print(f"\n{name}: A = {entry['rows']} rows, max/mean rows per expert {entry['imbalance']:.2f}; "
              f"correctness (max abs error against fp32): {entry['errors']}")
        entry["timing"] = time_variants(problem, fns, args)
        if args.sweep and device.type == "cuda":
            entry["sweep"] = sweep(problem)
        results["configs"][name] = entry
        del problem, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summarise(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lab09_benchmark.json").write_text(json.dumps(results, indent=1))
        plot(results, args.out / "lab09_benchmark.png")
        print(f"wrote {args.out / 'lab09_benchmark.json'}")


# -----------------------------------------------------------------------------
# The problem and the variants


def make_problem(T: int, C: int, *, num_experts: int, top_k: int, ffn_width: int, dtype: torch.dtype,
                 device: torch.device, seed: int) -> dict:
    """Expert-sorted rows as a random router would produce them, SwiGLU expert weights, an upstream gradient."""
    from .dispatch import make_dispatch
    from .router import top_k_routing

    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)

    E, F_ = num_experts, ffn_width
    logits = randn(T, E).float()
    _, experts, _ = top_k_routing(logits, top_k)
    plan = make_dispatch(experts, E)
    A = int(plan.offsets[-1])
    problem = {"x": randn(A, C), "w_gate_up": randn(E, C, 2 * F_, scale=C ** -0.5),
               "w_down": randn(E, F_, C, scale=F_ ** -0.5), "dy": randn(A, C), "offsets": plan.offsets,
               "counts": plan.counts, "flops": 6 * A * C * F_}
    # _grouped_mm's preferred (K-major) weights: the same values stored (E, N, K), passed transposed
    problem["w_gate_up_kmajor"] = problem["w_gate_up"].transpose(1, 2).contiguous()
    problem["w_down_kmajor"] = problem["w_down"].transpose(1, 2).contiguous()
    # the dense pair: one weight of each shape, the same A rows
    problem["w1_dense"], problem["w2_dense"] = problem["w_gate_up"][0].contiguous(), problem["w_down"][0].contiguous()
    return problem


def variants(problem: dict) -> dict:
    """name -> function(x, w_gate_up, w_down) returning the (A, C) output; each takes its own weight layout."""
    from .grouped_gemm import expert_mlp

    offsets = problem["offsets"]
    ends = offsets[1:].to(torch.int32)  # _grouped_mm's offs: the end of each group

    def ours(x, w1, w2):
        return expert_mlp(x, offsets, w1, w2, backend="triton")

    def loop(x, w1, w2):
        return expert_mlp(x, offsets, w1, w2, backend="torch")

    def grouped_mm(x, w1_kmajor, w2_kmajor):
        h = torch._grouped_mm(x, w1_kmajor.transpose(1, 2), offs=ends)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2_kmajor.transpose(1, 2), offs=ends)

    def dense(x, w1, w2):
        gate, up = (x @ w1).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2

    fns = {"ours": (ours, "w_gate_up", "w_down"), "loop": (loop, "w_gate_up", "w_down")}
    if hasattr(torch, "_grouped_mm") and problem["x"].is_cuda:
        fns["_grouped_mm"] = (grouped_mm, "w_gate_up_kmajor", "w_down_kmajor")
    fns["dense pair"] = (dense, "w1_dense", "w2_dense")
    return fns


def _run(problem: dict, fn, w1_key: str, w2_key: str, *, backward: bool):
    x, w1, w2 = problem["x"], problem[w1_key], problem[w2_key]
    if not backward:
        with torch.no_grad():
            return fn(x, w1, w2), None
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w2)]
    y = fn(*leaves)
    y.backward(problem["dy"])
    return y, [leaf.grad for leaf in leaves]


def check(problem: dict, fns: dict) -> dict:
    """Max abs error of each grouped variant's output and gradients against fp32 per-expert matmuls."""
    from .grouped_gemm import grouped_gemm_torch

    fp32 = {key: problem[key].detach().float().clone() for key in ("x", "w_gate_up", "w_down", "dy")}
    leaves = [fp32[k].requires_grad_(True) for k in ("x", "w_gate_up", "w_down")]
    h = grouped_gemm_torch(leaves[0], leaves[1], problem["offsets"])
    gate, up = h.chunk(2, dim=-1)
    y = grouped_gemm_torch(F.silu(gate) * up, leaves[2], problem["offsets"])
    y.backward(fp32["dy"])
    want = [y.detach()] + [leaf.grad for leaf in leaves]
    errors = {}
    for name, (fn, w1_key, w2_key) in fns.items():
        if name == "dense pair":
            continue
        try:
            out, grads = _run(problem, fn, w1_key, w2_key, backward=True)
        except RuntimeError as error:  # an older torch without _grouped_mm's backward: time its forward only
            if name != "_grouped_mm":
                raise
            problem["grouped_mm_backward"] = f"unsupported: {str(error).splitlines()[0][:100]}"
            out, grads = _run(problem, fn, w1_key, w2_key, backward=False)[0], None
            errors[name] = {"y": (out.float() - want[0]).abs().max().item()}
            continue
        if name == "_grouped_mm":  # its weight gradients come back in the K-major layout
            grads = [grads[0], grads[1].transpose(1, 2), grads[2].transpose(1, 2)]
        got = [out.detach()] + grads
        errors[name] = {part: (g.float() - w).abs().max().item() if w.numel() else 0.0
                        for part, g, w in zip(("y", "dx", "dw_gate_up", "dw_down"), got, want)}
    for part, error in errors["ours"].items():
        peer = errors["_grouped_mm"] if part in errors.get("_grouped_mm", {}) else errors["loop"]
        if error > 2 * peer[part] + 1e-3:
            raise RuntimeError(f"ours: {part} max abs error {error:.3g} against fp32, more than 2x the peer's "
                               f"{peer[part]:.3g} + 1e-3")
    return errors


# -----------------------------------------------------------------------------
# Timing


def time_variants(problem: dict, fns: dict, args) -> dict:
    from common.bench import interleaved

    report = {}
    for label, backward in (("forward", False), ("forward+backward", True)):
        names = [name for name in fns if not (backward and name == "_grouped_mm" and "grouped_mm_backward" in problem)]
        calls = {name: (lambda f=fns[name][0], a=fns[name][1], b=fns[name][2]: _run(problem, f, a, b,
                                                                                      backward=backward))
                 for name in names}
        timing = interleaved(calls, rounds=args.rounds, reps=args.reps, warmup=1 if args.smoke else 3)
        flops = problem["flops"] * (3 if backward else 1)
        entry = {"timing": timing.as_dict(), "tflops": {}, "ratios": {}}
        print(f"  {label}:")
        for name in names:
            tflops = flops / (timing.time(name).median * 1e-3) / 1e12
            entry["tflops"][name] = tflops
            print(f"    {name:<12} {timing.time(name)} ms  {tflops:7.1f} TFLOP/s")
        for peer in names:
            if peer == "ours":
                continue
            ratio = timing.ratio(peer, "ours")  # time(peer) / time(ours) = our throughput relative to the peer's
            entry["ratios"][f"ours vs {peer}"] = ratio.as_dict()
            verdict = f"  target >= {TARGET}x: {ratio.verdict(at_least=TARGET)}" if peer == "_grouped_mm" else ""
            print(f"    ours vs {peer:<12} {ratio}x throughput{verdict}")
            if peer == "_grouped_mm":
                entry["verdict"] = ratio.verdict(at_least=TARGET)
        report[label] = entry
    return report


def sweep(problem: dict) -> dict:
    """Forward+backward time of ours for each tile configuration in SWEEP (the same for the three kernels)."""
    import triton.testing

    from . import grouped_gemm as gg

    table = {}
    for entry in SWEEP:
        config = gg.GemmConfig(**dict(zip(("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages"),
                                          entry)))
        saved = gg.gemm_config
        gg.gemm_config = lambda x, weight_grad=False, c=config: c  # every launch of this run uses `config`
        try:
            fn, w1, w2 = variants(problem)["ours"]
            table[str(entry)] = {
                "forward_ms": triton.testing.do_bench(lambda: _run(problem, fn, w1, w2, backward=False)),
                "forward+backward_ms": triton.testing.do_bench(lambda: _run(problem, fn, w1, w2, backward=True))}
        except Exception as error:  # noqa: BLE001 - a config that does not fit is a result, not a crash
            table[str(entry)] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        finally:
            gg.gemm_config = saved
        print(f"    sweep {entry}: {table[str(entry)]}")
    return table


# -----------------------------------------------------------------------------
# Report


def summarise(results: dict) -> None:
    print(f"\nsummary ({results['environment'].get('gpu') or 'cpu'}), ours / _grouped_mm throughput, "
          f"target >= {TARGET}x on the whole spread:")
    for name, entry in results["configs"].items():
        for label, timing in entry["timing"].items():
            ratio = timing["ratios"].get("ours vs _grouped_mm")
            text = (f"{ratio['median']:.3f}x [{ratio['low']:.3f}-{ratio['high']:.3f}] {timing['verdict']}"
                    if ratio else "no _grouped_mm here")
            print(f"  {name:<18} {label:<17} {text}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results["configs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, label in zip(axes, ("forward", "forward+backward")):
        names = list(results["configs"][configs[0]]["timing"][label]["tflops"])
        width = 0.8 / len(names)
        for index, name in enumerate(names):
            values = [results["configs"][c]["timing"][label]["tflops"].get(name, 0.0) for c in configs]
            ax.bar([i + index * width for i in range(len(configs))], values, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs)
        ax.set_title(f"SwiGLU experts, {label}")
        ax.set_ylabel("TFLOP/s")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['environment'].get('gpu') or 'CPU (smoke)'}, T={results['tokens']}, "
                 f"C={results['width']}, {results['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
