"""Benchmark: our Triton FlashAttention-2 against torch SDPA's flash and cuDNN backends and naive attention (H100).

Checks correctness first (bf16 against an fp32 reference, compared with SDPA-flash's own bf16 error), then times
every implementation in the same run (triton.testing.do_bench, median) and prints ratios:

1. the CS336 2025 leaderboard shape, B1 H16 N16384 D64 bf16 causal, forward + backward.
   Target: at most 0.72x SDPA-flash's time.
2. forward, B4 H32 N4096 D128 bf16 causal. Target: at least 1.2x SDPA-flash's TFLOP/s.
3. TFLOP/s against sequence length (1k..16k, B * N = 16k tokens, H16 D64 bf16), forward and forward+backward,
   causal and not, for ours, SDPA-flash, cuDNN and naive (naive where it fits in memory).
4. peak memory of forward+backward, naive O(N^2) against ours O(N).

FLOPs (PERFORMANCE.md): forward 4 * B * H * Nq * Nk * D, halved when causal; forward+backward 3.5x forward.

    PYTHONPATH=reference:labs python -m lab07_flash_attention.benchmark --out results/
    PYTHONPATH=reference:labs python -m lab07_flash_attention.benchmark --out results/ --sweep   # also sweep tile sizes

Writes benchmark.json (GPU name, versions, date, every figure) and benchmark.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LEADERBOARD = dict(B=1, H=16, N=16384, D=64)  # CS336 2025, causal, bf16, fwd+bwd
FORWARD = dict(B=4, H=32, N=4096, D=128)  # causal, bf16, fwd
LEADERBOARD_TARGET = 0.72  # our time / SDPA-flash time, at most
FORWARD_TARGET = 1.2  # our TFLOP/s / SDPA-flash TFLOP/s, at least
CURVE_LENGTHS = (1024, 2048, 4096, 8192, 16384)
CURVE_TOKENS, CURVE_HEADS, CURVE_D = 16384, 16, 64


def attention_flops(B: int, H: int, N: int, D: int, *, causal: bool, backward: bool) -> float:
    forward = 4.0 * B * H * N * N * D / (2 if causal else 1)
    return forward * (3.5 if backward else 1.0)


def implementations() -> dict:
    """name -> attention(q, k, v, causal) for every peer; SDPA backends are forced, so a missing one raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from common.model import naive_attention

    from .attention import flash_attention

    def sdpa(backend):
        def run(q, k, v, causal):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    return {
        "ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "naive": lambda q, k, v, causal: naive_attention(q, k, v, causal=causal),
    }


def make_inputs(B: int, H: int, N: int, D: int, *, seed: int, dtype=torch.bfloat16, grad: bool = False):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=generator) for _ in range(4))
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, do


def bench_ms(fn, *, grads=()) -> float:
    """Median milliseconds of fn() over ~100 ms of repeats (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median"))


def time_attention(attention, B, H, N, D, *, causal: bool, backward: bool, seed: int = 0) -> float | None:
    """Milliseconds of one forward (or forward+backward), or None when the implementation is unavailable or OOM."""
    q, k, v, do = make_inputs(B, H, N, D, seed=seed, grad=backward)
    try:
        if backward:
            return bench_ms(lambda: attention(q, k, v, causal).backward(do), grads=(q, k, v))
        with torch.no_grad():
            return bench_ms(lambda: attention(q, k, v, causal))
    except Exception as error:  # noqa: BLE001 - a backend missing for this shape, naive OOM, a kernel that fails
        print(f"    ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]})")
        return None
    finally:
        del q, k, v, do
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# Correctness first


def check_correctness(B, H, N, D, *, causal: bool, seed: int) -> dict:
    """Max abs error of ours and of SDPA-flash (both bf16) against an fp32 reference; ours must be within 2x + 1e-3
    of SDPA-flash's error (flash-attn's own test criterion), for O, dQ, dK and dV."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = implementations()
    q, k, v, do = make_inputs(B, H, N, D, seed=seed, grad=True)
    results = {}
    for name, attention, cast in (("reference_fp32", None, torch.float32), ("ours", impls["ours"], None),
                                  ("sdpa_flash", impls["sdpa_flash"], None)):
        qq, kk, vv = (t.detach().to(cast or t.dtype).requires_grad_(True) for t in (q, k, v))
        if attention is None:  # fp32 reference: the memory-efficient backend keeps N^2 out of memory
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
        else:
            o = attention(qq, kk, vv, causal)
        o.backward(do.to(o.dtype))
        results[name] = [t.float() for t in (o.detach(), qq.grad, kk.grad, vv.grad)]
    report = {"shape": dict(B=B, H=H, N=N, D=D, causal=causal), "ok": True}
    for index, tensor in enumerate(("o", "dq", "dk", "dv")):
        ref = results["reference_fp32"][index]
        ours = (results["ours"][index] - ref).abs().max().item()
        peer = (results["sdpa_flash"][index] - ref).abs().max().item()
        ok = ours <= 2 * peer + 1e-3
        report[tensor] = dict(ours_max_abs_error=ours, sdpa_flash_max_abs_error=peer, ok=ok)
        report["ok"] &= ok
        print(f"  {tensor}: ours {ours:.3e}  sdpa-flash {peer:.3e}  {'ok' if ok else 'FAIL'}")
    return report


# -----------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for benchmark.json and benchmark.png")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile sizes (to choose defaults)")
    parser.add_argument("--no-curves", action="store_true", help="skip the TFLOP/s-against-length sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.py needs a CUDA GPU (an H100 for the recorded targets); none is available here")
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    started = time.monotonic()
    impls = implementations()

    def save() -> None:  # after every section: a run cut short by a time limit keeps what it measured
        results["wall_s"] = round(time.monotonic() - started, 1)
        (out / "benchmark.json").write_text(json.dumps(results, indent=1))

    print("== correctness (bf16 against fp32; ours within 2x SDPA-flash's error)")
    results["correctness"] = [check_correctness(**LEADERBOARD, causal=True, seed=1),
                              check_correctness(**FORWARD, causal=True, seed=2),
                              check_correctness(B=2, H=8, N=2000, D=128, causal=False, seed=3)]
    if not all(c["ok"] for c in results["correctness"]):
        print("CORRECTNESS FAILED: timings below are of a wrong kernel")
    save()

    print(f"== leaderboard: {LEADERBOARD} bf16 causal, forward+backward")
    board = {name: time_attention(fn, **LEADERBOARD, causal=True, backward=True) for name, fn in impls.items()}
    flops = attention_flops(**LEADERBOARD, causal=True, backward=True)
    for name, ms in board.items():
        print(f"  {name:<11} {ms and round(ms, 3)} ms   {ms and round(flops / ms / 1e9, 1)} TFLOP/s")
    ratio = _ratio(board["ours"], board["sdpa_flash"])
    results["leaderboard"] = dict(shape=LEADERBOARD, ms=board, tflops={n: ms and flops / ms / 1e9 for n, ms in
                                  board.items()}, ratio_to_sdpa_flash=ratio, target=LEADERBOARD_TARGET,
                                  met=ratio <= LEADERBOARD_TARGET)
    print(f"  ours / sdpa_flash time = {ratio:.3f}  (target <= {LEADERBOARD_TARGET}: "
          f"{'MET' if ratio <= LEADERBOARD_TARGET else 'MISSED'})")
    save()

    results["leaderboard"]["ours_split_ms"] = split = leaderboard_split()
    print(f"  ours split: {split}")
    save()

    print(f"== forward: {FORWARD} bf16 causal")
    fwd = {name: time_attention(impls[name], **FORWARD, causal=True, backward=False)
           for name in ("ours", "sdpa_flash", "cudnn", "naive")}
    flops = attention_flops(**FORWARD, causal=True, backward=False)
    tflops = {name: ms and flops / ms / 1e9 for name, ms in fwd.items()}
    for name, ms in fwd.items():
        print(f"  {name:<11} {ms and round(ms, 3)} ms   {tflops[name] and round(tflops[name], 1)} TFLOP/s")
    speedup = 1 / _ratio(fwd["ours"], fwd["sdpa_flash"])
    results["forward"] = dict(shape=FORWARD, ms=fwd, tflops=tflops, ratio_to_sdpa_flash=speedup,
                              target=FORWARD_TARGET, met=speedup >= FORWARD_TARGET)
    print(f"  ours / sdpa_flash TFLOP/s = {speedup:.3f}  (target >= {FORWARD_TARGET}: "
          f"{'MET' if speedup >= FORWARD_TARGET else 'MISSED'})")
    save()
    if args.sweep:
        from .tuning import sweep

        print("== tile-size sweep (causal, bf16)")
        results["sweep"] = sweep()
        save()

    print("== peak memory of forward+backward (B1 H16 D64 bf16 causal): naive O(N^2) vs ours O(N)")
    results["memory"] = memory_curve(impls)
    save()

    if not args.no_curves:
        print(f"== TFLOP/s against sequence length (B * N = {CURVE_TOKENS}, H{CURVE_HEADS} D{CURVE_D} bf16)")
        results["curves"] = tflops_curves(impls)
        plot(results, out / "benchmark.png")
    save()
    print(f"wrote {out / 'benchmark.json'} ({results['wall_s']} s)")
    return results


def leaderboard_split() -> dict:
    """Our forward and backward alone on the leaderboard shape, and the backward without the two-stream overlap."""
    from .flash_bwd import bwd_config, flash_attn_bwd
    from .flash_fwd import flash_attn_fwd

    q, k, v, do = make_inputs(**LEADERBOARD, seed=5)
    o, lse = flash_attn_fwd(q, k, v, causal=True)
    serial = dataclasses.replace(bwd_config(q), overlap_dq=False)
    return {
        "forward": bench_ms(lambda: flash_attn_fwd(q, k, v, causal=True)),
        "backward": bench_ms(lambda: flash_attn_bwd(q, k, v, o, lse, do, causal=True)),
        "backward_one_stream": bench_ms(lambda: flash_attn_bwd(q, k, v, o, lse, do, causal=True, config=serial)),
    }


def _ratio(ours: float | None, peer: float | None) -> float:
    """ours / peer, or inf when either is missing (so a target reads as missed, never as met)."""
    return ours / peer if ours and peer else math.inf


def memory_curve(impls: dict) -> dict:
    from common.measure import cuda_peak_memory

    curve = {"N": [], "ours_MiB": [], "naive_MiB": []}
    for N in (1024, 2048, 4096, 8192, 16384):
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


def tflops_curves(impls: dict) -> dict:
    curves = {}
    for causal in (True, False):
        for backward in (False, True):
            key = f"{'fwd+bwd' if backward else 'fwd'}, {'causal' if causal else 'non-causal'}"
            curves[key] = {name: [] for name in impls}
            for N in CURVE_LENGTHS:
                B = max(1, CURVE_TOKENS // N)
                flops = attention_flops(B, CURVE_HEADS, N, CURVE_D, causal=causal, backward=backward)
                cells = []
                for name, fn in impls.items():
                    ms = time_attention(fn, B, CURVE_HEADS, N, CURVE_D, causal=causal, backward=backward)
                    curves[key][name].append(ms and flops / ms / 1e9)
                    cells.append(f"{name} {ms and round(flops / ms / 1e9)}")
                print(f"  {key:<20} N={N:<6} " + "  ".join(cells))
    return curves


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plotting import line_plot

    curves = results["curves"]
    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(5 * (len(curves) + 1), 4))
    for ax, (key, series) in zip(axes, curves.items()):
        # None (OOM / unavailable) becomes nan, a gap in the line
        clean = {name: [math.nan if y is None else y for y in ys] for name, ys in series.items()}
        line_plot(CURVE_LENGTHS, clean, xlabel="sequence length N", ylabel="TFLOP/s", title=key, logx=True, ax=ax)
    memory = results["memory"]
    line_plot(memory["N"], {name: [math.nan if y is None else y for y in memory[f"{name}_MiB"]]
                            for name in ("ours", "naive")},
              xlabel="sequence length N", ylabel="peak MiB (fwd+bwd)", title="memory", logx=True, logy=True,
              ax=axes[-1])
    fig.suptitle(f"FlashAttention-2 (Triton) vs SDPA on {results['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
