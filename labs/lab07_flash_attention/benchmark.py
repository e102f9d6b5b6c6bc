"""Benchmark: our Triton FlashAttention-2 against the attention a user would otherwise call, in one run.

Peers: torch SDPA's flash backend (torch's FlashAttention-2 build) and its cuDNN backend, FlexAttention
(`torch.nn.attention.flex_attention`, compiled), `torch.compile` of the naive attention, and the naive attention
itself (O(N^2) memory). Correctness comes first: bf16 outputs and gradients against an fp32 reference, ours within 2x
SDPA-flash's own error (flash-attn's test criterion), fp32 against float64, and every peer's error recorded.

Timing: `common.bench.interleaved`. The variants of a shape are warmed up (compiled), then timed in rotating
interleaved rounds with CUDA events; every time is the median of the round medians with its spread [min-max], every
ratio the per-round ratios (both variants timed seconds apart); a target is "met" only when the whole spread clears it.

1. The CS336 2025 leaderboard shape, B1 H16 N16384 D64 bf16 causal, forward + backward.
   Targets: at most 0.72x SDPA-flash's time (the course's); at most 1.0x cuDNN's (on par with the fastest peer).
2. Forward, B4 H32 N4096 D128 bf16 causal. Targets: at least 1.2x SDPA-flash's TFLOP/s; at least 0.95x cuDNN's.
3. Peak memory of forward + backward against N: naive O(N^2), ours O(N).
4. The sweep (as CS336's): causal, B1 H16, N in (1024, 4096, 16384), D in (16, 32, 64, 128), bf16 and fp32, forward
   and forward + backward; ours against SDPA-flash and cuDNN (bf16) or SDPA's own choice (fp32, which flash and cuDNN
   do not take); then FlexAttention beside ours at N = 4096, D 64 and 128, forward + backward (each point compiles
   its own kernels: few points keep the run short). Our fp32 kernels multiply in full fp32 ("ieee"), never TF32. A
   time budget (--budget-s) skips the sweep points left over, and says so.

FLOPs: forward 4 * B * H * N^2 * D, halved when causal; forward + backward 3.5x forward.

    PYTHONPATH=reference:labs python -m lab07_flash_attention.benchmark --out results/        # H200: ~4 min
    PYTHONPATH=reference:labs python -m lab07_flash_attention.benchmark --out /tmp/b --smoke  # CPU, seconds
    ... --tiles   also time a grid of tile sizes (tuning.py: how the launchers' block sizes were chosen)

Writes benchmark.json (common.bench.environment(): GPU, versions, date; every figure with its spread) and
benchmark.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

LEADERBOARD = dict(B=1, H=16, N=16384, D=64)  # CS336 2025, causal, bf16, fwd+bwd
FORWARD = dict(B=4, H=32, N=4096, D=128)  # causal, bf16, fwd
TARGETS = {  # (section, numerator / denominator of per-round times, bound)
    "leaderboard ours / sdpa_flash time": ("leaderboard", "ours", "sdpa_flash", dict(at_most=0.72)),
    "leaderboard ours / cudnn time": ("leaderboard", "ours", "cudnn", dict(at_most=1.0)),
    "forward TFLOP/s ours / sdpa_flash": ("forward", "sdpa_flash", "ours", dict(at_least=1.2)),
    "forward TFLOP/s ours / cudnn": ("forward", "cudnn", "ours", dict(at_least=0.95)),
}
SWEEP_LENGTHS, SWEEP_HEAD_DIMS, SWEEP_DTYPES = (1024, 4096, 16384), (16, 32, 64, 128), ("bfloat16", "float32")
SWEEP_FLEX_LENGTH = 4096
MEMORY_LENGTHS = (1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Shapes and timing effort of one run: the full GPU run, or the seconds-long CPU smoke test."""

    device: str
    leaderboard: dict
    forward: dict
    lengths: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    flex_length: int
    headline_dtype: torch.dtype
    rounds: int = 7
    reps: int = 10
    sweep_rounds: int = 5
    sweep_reps: int = 3
    compiled: bool = True  # FlexAttention and the naive attention through torch.compile (eager in the smoke test)

    @staticmethod
    def gpu() -> "Plan":
        return Plan(device="cuda", leaderboard=LEADERBOARD, forward=FORWARD, lengths=SWEEP_LENGTHS,
                    head_dims=SWEEP_HEAD_DIMS, dtypes=SWEEP_DTYPES, flex_length=SWEEP_FLEX_LENGTH,
                    headline_dtype=torch.bfloat16)

    @staticmethod
    def smoke() -> "Plan":
        # the Triton interpreter on CPU: fp32 only, a few tiles per kernel
        return Plan(device="cpu", leaderboard=dict(B=1, H=2, N=64, D=16), forward=dict(B=1, H=2, N=48, D=32),
                    lengths=(32, 64), head_dims=(16, 32), dtypes=("float32",), flex_length=64,
                    headline_dtype=torch.float32, rounds=2, reps=1, sweep_rounds=2, sweep_reps=1, compiled=False)


def attention_flops(B: int, H: int, N: int, D: int, *, causal: bool, backward: bool) -> float:
    forward = 4.0 * B * H * N * N * D / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


# -----------------------------------------------------------------------------
# The implementations: name -> attention(q, k, v, causal) -> o


def implementations(*, compiled: bool) -> dict[str, Callable]:
    """Ours and every peer. SDPA backends are forced, so a backend that cannot run a shape raises (and is reported)
    instead of silently falling back to another."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from common.model import naive_attention

    from .attention import flash_attention

    def sdpa(backend):
        def run(q, k, v, causal):
            if backend is None:  # SDPA's own choice (fp32: the memory-efficient kernel)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    masks: dict[tuple, object] = {}

    def flex_run(q, k, v, causal):
        if not causal:
            return flex(q, k, v)
        key = (q.shape[-2], k.shape[-2], str(q.device))
        if key not in masks:  # the block mask is built once per shape, outside the timed calls
            masks[key] = create_block_mask(_causal_mask, None, None, q.shape[-2], k.shape[-2], device=q.device)
        return flex(q, k, v, block_mask=masks[key])

    naive_compiled = torch.compile(naive_attention, dynamic=False) if compiled else naive_attention
    return {
        "ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa": sdpa(None),
        "flex": flex_run,
        "compiled_naive": lambda q, k, v, causal: naive_compiled(q, k, v, causal=causal),
        "naive": lambda q, k, v, causal: naive_attention(q, k, v, causal=causal),
    }


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx  # FlexAttention's mask_mod (square shapes: top-left = bottom-right alignment)


def make_inputs(B: int, H: int, N: int, D: int, *, seed: int, dtype=torch.bfloat16, device: str = "cuda",
                grad: bool = False) -> list[torch.Tensor]:
    """q, k, v, dO: (B, H, N, D) standard normal, seeded."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = [torch.randn(B, H, N, D, device=device, dtype=dtype, generator=generator) for _ in range(4)]
    for t in tensors[:3]:
        t.requires_grad_(grad)
    return tensors


# -----------------------------------------------------------------------------
# Timing: interleaved rounds of every variant that runs


def time_variants(impls: dict[str, Callable], names: list[str], shape: dict, *, causal: bool, backward: bool,
                  dtype: torch.dtype, plan: Plan, rounds: int, reps: int, seed: int = 0) -> dict:
    """Time `names` on one shape, interleaved. A variant that fails its first call (a backend that does not take
    the shape, out of memory) is left out and its error recorded. Returns {"timing", "failed", "tflops"}."""
    from common.bench import interleaved

    q, k, v, do = make_inputs(**shape, seed=seed, dtype=dtype, device=plan.device, grad=backward)

    def step(attention):
        if backward:
            def run():
                q.grad = k.grad = v.grad = None  # no gradient accumulation inside the timed call
                attention(q, k, v, causal).backward(do)
        else:
            def run():
                with torch.no_grad():
                    attention(q, k, v, causal)
        return run

    variants, failed = {}, {}
    for name in names:
        run = step(impls[name])
        try:
            run()  # the first call compiles (Triton, Inductor) and shows whether the variant runs at all
            _synchronize(plan.device)
            variants[name] = run
        except Exception as error:  # noqa: BLE001 - an unsupported shape or OOM is a result, not a crash
            failed[name] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
            _free(plan.device)
    result = {"failed": failed}
    if variants:
        timing = interleaved(variants, rounds=rounds, reps=reps, warmup=2, device=plan.device)
        flops = attention_flops(**shape, causal=causal, backward=backward)
        result["timing"] = timing
        result["tflops"] = {name: flops / timing.time(name).median / 1e9 for name in variants}
    del q, k, v, do
    _free(plan.device)
    return result


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _section(result: dict, shape: dict, *, causal: bool, backward: bool, dtype: torch.dtype) -> dict:
    """A timed section as plain data (JSON)."""
    out = {"shape": shape, "causal": causal, "backward": backward, "dtype": str(dtype).removeprefix("torch."),
           "failed": result["failed"], "tflops": result.get("tflops", {})}
    if "timing" in result:
        out["timing"] = result["timing"].as_dict()
    return out


# -----------------------------------------------------------------------------
# Correctness first


def check_correctness(impls: dict, B, H, N, D, *, causal: bool, seed: int, plan: Plan,
                      compiled_peers: bool = True) -> dict:
    """Max abs error of ours and the peers against a reference from the same inputs, for O, dQ, dK, dV.

    bf16 (on a GPU): against fp32 (SDPA's memory-efficient kernel), ours within 2x SDPA-flash's error + 1e-3.
    fp32 (the smoke test, and one check on the GPU): against float64 (SDPA's math backend), ours within 1e-4.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = plan.headline_dtype
    q, k, v, do = make_inputs(B, H, N, D, seed=seed, dtype=dtype, device=plan.device)
    wide = torch.float64 if dtype == torch.float32 else torch.float32

    def run(attention, cast):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_(True) for t in (q, k, v)]
        o = attention(*leaves, causal)
        o.backward(do.to(o.dtype))
        return [t.float() for t in (o.detach(), *(leaf.grad for leaf in leaves))]

    def reference(q, k, v, causal):
        # fp32: the memory-efficient kernel keeps N^2 out of memory at N = 16384; float64: only the math backend
        backend = SDPBackend.MATH if q.dtype == torch.float64 else SDPBackend.EFFICIENT_ATTENTION
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    ref = run(reference, wide)
    peers = ["sdpa_flash", "cudnn"] if plan.device == "cuda" and dtype != torch.float32 else ["sdpa"]
    if compiled_peers:  # each new shape compiles them again: checked where they are timed with gradients
        peers += ["flex", "compiled_naive"]
    errors, report = {}, {"shape": dict(B=B, H=H, N=N, D=D, causal=causal), "dtype": str(dtype), "ok": True}
    for name in ["ours", *peers]:
        try:
            got = run(impls[name], None)
        except Exception as error:  # noqa: BLE001 - a peer that cannot run this shape
            report[f"{name}_failed"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
            continue
        errors[name] = [(g - r).abs().max().item() for g, r in zip(got, ref)]
        _free(plan.device)
    if "ours" not in errors:
        print(f"  ours failed: {report['ours_failed']}")
        report["ok"] = False
        return report
    # the bound: 2x the error of torch's own bf16 kernel + 1e-3 (cuDNN's when flash cannot run); fp32: 1e-4 relative
    # to the largest value (a gradient entry sums N products)
    peer = next((name for name in ("sdpa_flash", "cudnn") if name in errors), None)
    for index, tensor in enumerate(("o", "dq", "dk", "dv")):
        ours = errors["ours"][index]
        scale = max(1.0, ref[index].abs().max().item())
        bound = 2 * errors[peer][index] + 1e-3 if peer else 1e-4 * scale
        ok = ours <= bound
        report[tensor] = {**{f"{name}_max_abs_error": e[index] for name, e in errors.items()}, "bound": bound,
                          "ok": ok}
        report["ok"] &= ok
        cells = "  ".join(f"{name} {e[index]:.3e}" for name, e in errors.items())
        print(f"  {tensor}: {cells}  (ours <= {bound:.3e}: {'ok' if ok else 'FAIL'})")
    del q, k, v, do, ref
    _free(plan.device)
    return report


# -----------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for benchmark.json and benchmark.png")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU run of every section (tiny shapes)")
    parser.add_argument("--tiles", action="store_true", help="also time a grid of tile sizes (tuning.py)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the head-dim / dtype / length sweep")
    parser.add_argument("--sweep-only", action="store_true", help="correctness, then only the sweep (its whole budget "
                        "for the sweep: the headline shapes and the memory curve are skipped)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="sweep points left after this many seconds "
                        "of the whole run are skipped (and listed as skipped)")
    args = parser.parse_args(argv)
    if args.sweep_only and args.no_sweep:
        parser.error("--sweep-only and --no-sweep exclude each other")
    if args.smoke:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (imported)
        # uncompiled FlexAttention is the point of the smoke test (no compiler needed), not a mistake to warn about
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        plan = Plan.smoke()
    elif not torch.cuda.is_available():
        raise SystemExit("benchmark.py needs a CUDA GPU (an H200 for the recorded figures); --smoke runs on CPU")
    else:
        plan = Plan.gpu()
    from common.bench import environment

    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape and dtype: never fall back to eager
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(), "smoke": args.smoke, "targets": {}}
    started = time.monotonic()
    impls = implementations(compiled=plan.compiled)

    def save() -> None:  # after every section: a run cut short by a time limit keeps what it measured
        results["wall_s"] = round(time.monotonic() - started, 1)
        (out / "benchmark.json").write_text(json.dumps(results, indent=1))

    print(f"== correctness ({plan.headline_dtype} against a wider reference from the same inputs)")
    small = dict(B=2, H=8, N=2000, D=128) if plan.device == "cuda" else dict(B=1, H=2, N=37, D=16)
    results["correctness"] = [
        check_correctness(impls, **plan.leaderboard, causal=True, seed=1, plan=plan),
        check_correctness(impls, **plan.forward, causal=True, seed=2, plan=plan, compiled_peers=False),
        check_correctness(impls, **small, causal=False, seed=3, plan=plan, compiled_peers=False),
        check_correctness(impls, **small, causal=True, seed=4, plan=dataclasses.replace(
            plan, headline_dtype=torch.float32), compiled_peers=False),  # fp32 against float64 / fp32 SDPA
    ]
    if not all(c["ok"] for c in results["correctness"]):
        print("CORRECTNESS FAILED: the timings below are of a wrong kernel")
    save()

    peers = ["sdpa_flash", "cudnn"] if plan.device == "cuda" else ["sdpa"]
    headline = ["ours", *peers, "flex", "compiled_naive", "naive"]
    headline_sections = () if args.sweep_only else (
        ("leaderboard", plan.leaderboard, True), ("forward", plan.forward, False))
    for section, shape, backward in headline_sections:
        print(f"== {section}: {shape} {plan.headline_dtype} causal, {'forward+backward' if backward else 'forward'}")
        timed = time_variants(impls, headline, shape, causal=True, backward=backward, dtype=plan.headline_dtype,
                              plan=plan, rounds=plan.rounds, reps=plan.reps)
        results[section] = _section(timed, shape, causal=True, backward=backward, dtype=plan.headline_dtype)
        _print_timing(timed)
        if plan.device == "cuda":  # the smoke test has none of the GPU peers the targets name
            results["targets"].update(_verdicts(section, timed))
        save()

    if plan.device == "cuda" and not args.sweep_only:
        results["leaderboard"]["ours_split"] = leaderboard_split(plan)
        print("== peak memory of forward+backward (B1 H16 D64 bf16 causal): naive O(N^2) vs ours O(N)")
        results["memory"] = memory_curve(impls)
        save()

    if not args.no_sweep:
        print(f"== sweep: causal B1 H16, N {plan.lengths}, D {plan.head_dims}, {plan.dtypes}")
        results["sweep"] = sweep(impls, plan, deadline=started + args.budget_s, save=lambda rows: (
            results.__setitem__("sweep", rows), save()))
        save()
    if args.tiles and plan.device == "cuda":
        from .tuning import sweep as tile_sweep

        print("== tile-size sweep (causal, bf16)")
        results["tiles"] = tile_sweep()
        save()
    plot(results, out / "benchmark.png")
    save()
    print(f"wrote {out / 'benchmark.json'} ({results['wall_s']} s)")
    return results


def _print_timing(timed: dict) -> None:
    for name, error in timed["failed"].items():
        print(f"  {name:<15} failed: {error}")
    if "timing" not in timed:
        return
    timing = timed["timing"]
    for name in timing.rounds_ms:
        ratio = "" if name == "ours" else f"   ours / {name} time {timing.ratio('ours', name)}"
        print(f"  {name:<15} {timing.time(name)} ms   {timed['tflops'][name]:.1f} TFLOP/s{ratio}")


def _verdicts(section: str, timed: dict) -> dict:
    """The targets of this section, judged on the whole spread of the per-round ratio (missing peer: missed)."""
    verdicts = {}
    for label, (where, numerator, denominator, bound) in TARGETS.items():
        if where != section:
            continue
        timing = timed.get("timing")
        if timing is None or not {numerator, denominator} <= set(timing.rounds_ms):
            verdicts[label] = {"verdict": "missed", "why": "a variant did not run", **bound}
        else:
            ratio = timing.ratio(numerator, denominator)
            verdicts[label] = {"ratio": ratio.as_dict(), "verdict": ratio.verdict(**bound), **bound}
        print(f"  target {label} {'<=' if 'at_most' in bound else '>='} {next(iter(bound.values()))}: "
              f"{verdicts[label].get('ratio', {}).get('median', float('nan')):.3f} "
              f"[{verdicts[label].get('ratio', {}).get('low', float('nan')):.3f}-"
              f"{verdicts[label].get('ratio', {}).get('high', float('nan')):.3f}] -> {verdicts[label]['verdict']}")
    return verdicts


def leaderboard_split(plan: Plan) -> dict:
    """Our forward and backward alone on the leaderboard shape, and the backward without the two-stream overlap."""
    from common.bench import interleaved

    from .flash_bwd import bwd_config, flash_attn_bwd
    from .flash_fwd import flash_attn_fwd

    q, k, v, do = make_inputs(**LEADERBOARD, seed=5)
    o, lse = flash_attn_fwd(q, k, v, causal=True)
    serial = dataclasses.replace(bwd_config(q), overlap_dq=False)
    timing = interleaved({
        "forward": lambda: flash_attn_fwd(q, k, v, causal=True),
        "backward": lambda: flash_attn_bwd(q, k, v, o, lse, do, causal=True),
        "backward_one_stream": lambda: flash_attn_bwd(q, k, v, o, lse, do, causal=True, config=serial),
    }, rounds=plan.rounds, reps=plan.reps, warmup=3, device="cuda")
    print("  ours split:\n    " + timing.table(baseline="forward").replace("\n", "\n    "))
    return timing.as_dict()


def memory_curve(impls: dict) -> dict:
    from common.measure import cuda_peak_memory

    curve = {"N": [], "ours_MiB": [], "naive_MiB": []}
    for N in MEMORY_LENGTHS:
        q, k, v, do = make_inputs(1, 16, N, 64, seed=N, grad=True)
        row = {}
        for name in ("ours", "naive"):
            try:
                row[name] = cuda_peak_memory(lambda: impls[name](q, k, v, True).backward(do)) / 2**20
            except torch.OutOfMemoryError:
                row[name] = None
            torch.cuda.empty_cache()
        curve["N"].append(N)
        curve["ours_MiB"].append(row["ours"])
        curve["naive_MiB"].append(row["naive"])
        print(f"  N={N:<6} ours {row['ours'] and round(row['ours'], 1)} MiB   naive "
              f"{row['naive'] and round(row['naive'], 1)} MiB")
        del q, k, v, do
    return curve


def sweep(impls: dict, plan: Plan, *, deadline: float, save: Callable[[list], None]) -> list[dict]:
    """TFLOP/s of ours and the SDPA peers over dtypes, head dims and lengths (causal, B1 H16), forward and
    forward+backward; then FlexAttention beside ours, forward+backward at N = plan.flex_length for the two largest
    head dims (each point compiles its own kernels, so these come last). Points past the deadline are recorded as
    skipped."""
    rows: list[dict] = []
    points = [(dtype, D, N, backward, ()) for dtype in plan.dtypes for D in plan.head_dims for N in plan.lengths
              for backward in (False, True)]
    points += [(dtype, D, plan.flex_length, True, ("flex",)) for dtype in plan.dtypes for D in plan.head_dims[-2:]]
    for dtype_name, D, N, backward, extra in points:
        dtype = getattr(torch, dtype_name)
        if extra:
            names = ["ours", *extra]
        elif dtype != torch.float32 and plan.device == "cuda":
            names = ["ours", "sdpa_flash", "cudnn"]
        else:
            names = ["ours", "sdpa"]  # flash and cuDNN take no fp32: SDPA picks its memory-efficient kernel
        shape = dict(B=1, H=16 if plan.device == "cuda" else 2, N=N, D=D)
        row = {"shape": shape, "dtype": dtype_name, "pass": "fwd+bwd" if backward else "fwd", "variants": names}
        if time.monotonic() > deadline:
            rows.append({**row, "skipped": "time budget (--budget-s) spent"})
            continue
        timed = time_variants(impls, names, shape, causal=True, backward=backward, dtype=dtype, plan=plan,
                              rounds=plan.sweep_rounds, reps=plan.sweep_reps, seed=N + D)
        row.update(_section(timed, shape, causal=True, backward=backward, dtype=dtype))
        rows.append(row)
        cells = "  ".join(f"{name} {tflops:.0f}" for name, tflops in timed.get("tflops", {}).items())
        print(f"  {dtype_name:<8} D={D:<3} N={N:<6} {row['pass']:<8} TFLOP/s: {cells}"
              + (f"  (failed: {', '.join(timed['failed'])})" if timed["failed"] else ""))
        save(rows)
    skipped = sum("skipped" in row for row in rows)
    if skipped:
        print(f"  {skipped} sweep points skipped: the time budget was spent")
    return rows


def plot(results: dict, path: Path) -> None:
    """TFLOP/s against N per head dim (ours solid, the best SDPA peer dashed), per dtype; and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plotting import line_plot

    rows = [row for row in results.get("sweep", []) if row.get("tflops") and row["pass"] == "fwd+bwd"
            and "flex" not in row["variants"]]
    dtypes = sorted({row["dtype"] for row in rows})
    panels = len(dtypes) + (1 if "memory" in results else 0)
    if panels == 0:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        series: dict[str, list[float]] = {}
        lengths = sorted({row["shape"]["N"] for row in rows if row["dtype"] == dtype})
        for D in sorted({row["shape"]["D"] for row in rows if row["dtype"] == dtype}):
            for name in ("ours", "sdpa_flash", "cudnn", "sdpa"):
                ys = []
                for N in lengths:
                    match = [r for r in rows if r["dtype"] == dtype and r["shape"]["D"] == D and r["shape"]["N"] == N]
                    ys.append(match[0]["tflops"].get(name, math.nan) if match else math.nan)
                if not all(math.isnan(y) for y in ys):
                    series[f"{name} D{D}"] = ys
        line_plot(lengths, series, xlabel="sequence length N", ylabel="TFLOP/s (fwd+bwd, causal)", title=dtype,
                  logx=True, ax=ax)
        ax.legend(fontsize=6, ncol=2)
    if "memory" in results:
        memory = results["memory"]
        line_plot(memory["N"], {name: [math.nan if y is None else y for y in memory[f"{name}_MiB"]]
                                for name in ("ours", "naive")},
                  xlabel="sequence length N", ylabel="peak MiB (fwd+bwd)", title="memory", logx=True, logy=True,
                  ax=axes[0][-1])
    gpu = results["environment"].get("gpu") or "CPU (smoke test)"
    fig.suptitle(f"FlashAttention-2 (Triton) vs SDPA on {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
