"""Benchmark: the paged decode kernel against SDPA on a contiguous cache, and the engine against HF generate (GPU).

    PYTHONPATH=reference:labs python -m lab08_serving.benchmark --out results/
    PYTHONPATH=reference:labs python -m lab08_serving.benchmark --smoke          # seconds on a CPU, figures meaningless

1. Decode attention, GQA 32/8, D = 128, bf16, cache blocks of 16 tokens at random places, all sequences at the full
   context: B64 ctx4096, B16 ctx16k, B1 ctx32k. Correctness first (against fp32 math attention on the gathered
   cache, within 2x SDPA-flash's bf16 error + 1e-3), then interleaved timing (common.bench) of the kernel (default
   split-K, and one split) against SDPA's flash and cuDNN backends on a contiguous (B, H_kv, N, D) cache (enable_gqa,
   so the peers read each K/V head once too). Figure: GB/s of K/V read = 2 * B * N * H_kv * D * 2 bytes / time.
   Target (docs/performance.md): at least SDPA-cuDNN's bandwidth at B64 ctx4096. A sweep of tile sizes at that shape is
   recorded too (--no-sweep skips it).
2. Serving: a ~250M Llama (HF LlamaConfig: 16 layers, width 1024, GQA 16/8, FFN 2816, vocab 32000) built from a config
   in bf16; 256 requests, prompts of 32-512 tokens, outputs of 32-512 (metrics.synthetic_workload, seed 0), greedy,
   all submitted at once. Correctness first: 16 of the requests (outputs cut to 32 tokens) in float32, the engine
   against HF generate one request at a time: identical tokens expected. Then the engine (CUDA graphs, Triton kernel)
   and HF generate with static batches of 128 (left-padded; each batch runs to its longest output), interleaved;
   useful output tokens/s = the tokens the requests asked for / wall time. Target: at least 10x HF. The bf16 outputs of
   both are compared as well (bf16 rounding differs between batch shapes, so long greedy runs can part at near-ties;
   the agreement is reported, not asserted). The engine without CUDA graphs is timed once, to show what they buy.

Writes benchmark.json (GPU, versions, date, every figure) and benchmark.png into --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.bench import environment, interleaved
from common.target import has_gpu_device

if not has_gpu_device():  # --smoke on a CPU: kernels run in Triton's interpreter, which must be chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .engine import LLM, EngineConfig
from .metrics import summarize, synthetic_workload
from .paged_attention import DecodeConfig, paged_decode_attention
from .sampling import SamplingParams  # noqa: E402  (after the interpreter switch above)

KERNEL_CASES = [(64, 4096), (16, 16384), (1, 32768)]  # (B, context)
SWEEP = [DecodeConfig(block_n=n, num_warps=4, num_stages=s) for n in (32, 64, 128) for s in (2, 3)] + [
    DecodeConfig(block_n=64, num_warps=8, num_stages=2), DecodeConfig(block_n=128, num_warps=8, num_stages=3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="directory for benchmark.json and benchmark.png")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU check of the script itself")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the serving comparison (HF takes "
                        "~40 s a round)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel tile sweep")
    parser.add_argument("--skip-serving", action="store_true")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; run it with --smoke to check the script on a CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "smoke": args.smoke}
    results["kernel"] = bench_kernel(smoke=args.smoke)
    if not args.no_sweep and not args.smoke:
        results["sweep"] = sweep_kernel()
    if not args.skip_serving:
        results["serving"] = bench_serving(smoke=args.smoke, rounds=1 if args.smoke else args.rounds)
    (out / "benchmark.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "benchmark.png")
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.png'}")


# -----------------------------------------------------------------------------
# 1. Decode attention


def kernel_inputs(B: int, context: int, *, H: int, H_kv: int, D: int, block_size: int, device, dtype, seed: int = 0):
    """A paged cache with every sequence at `context` tokens in randomly placed blocks, and its contiguous copy."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    per_seq = context // block_size
    tables = torch.randperm(B * per_seq, generator=generator).view(B, per_seq).to(torch.int32)
    k_cache = torch.randn(B * per_seq, block_size, H_kv, D, generator=generator).to(device, dtype)
    v_cache = torch.randn(B * per_seq, block_size, H_kv, D, generator=generator).to(device, dtype)
    q = torch.randn(B, H, D, generator=generator).to(device, dtype)
    tables, lens = tables.to(device), torch.full((B,), context, dtype=torch.int32, device=device)
    flat = tables.long()  # (B, per_seq) -> contiguous (B, H_kv, N, D)
    k = k_cache[flat].reshape(B, context, H_kv, D).transpose(1, 2).contiguous()
    v = v_cache[flat].reshape(B, context, H_kv, D).transpose(1, 2).contiguous()
    return q, k_cache, v_cache, tables, lens, k, v


def sdpa_decode(q, k, v, backend):
    """The peer: SDPA of one query token per sequence over a contiguous cache, on one backend."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def bench_kernel(*, smoke: bool) -> list[dict]:
    from torch.nn.attention import SDPBackend

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = dict(H=4, H_kv=2, D=16, block_size=4) if smoke else dict(H=32, H_kv=8, D=128, block_size=16)
    cases = [(2, 64)] if smoke else KERNEL_CASES
    peers = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION}
    if smoke:
        peers = {"sdpa math": SDPBackend.MATH}
    report = []
    for B, context in cases:
        q, k_cache, v_cache, tables, lens, k, v = kernel_inputs(B, context, device=device, dtype=dtype, **shape)
        kv_bytes = 2 * k.numel() * k.element_size()
        variants = {
            "ours": lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, max_context_len=context),
            "ours, 1 split": lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, num_splits=1),
        }
        skipped = {}
        for name, backend in peers.items():
            try:  # a backend that cannot run this shape (or GQA) is reported, not fatal
                sdpa_decode(q, k, v, backend)
                variants[name] = lambda backend=backend: sdpa_decode(q, k, v, backend)
            except RuntimeError as error:
                skipped[name] = str(error).splitlines()[0][:200]
                print(f"{name} cannot run B{B} ctx{context}: {skipped[name]}")
        # correctness first: every variant against fp32 math attention on the contiguous cache
        reference = sdpa_decode(q.float(), k.float(), v.float(), SDPBackend.MATH)
        errors = {name: (fn().float() - reference).abs().max().item() for name, fn in variants.items()}
        peer_error = max([errors[name] for name in peers if name in variants] or [0.0])
        for name in ("ours", "ours, 1 split"):
            if errors[name] > 2 * peer_error + 1e-3:
                raise RuntimeError(f"B{B} ctx{context}: {name} max abs error {errors[name]:.3g} exceeds 2x the "
                                   f"peers' {peer_error:.3g} + 1e-3")
        timing = interleaved(variants, rounds=2 if smoke else 7, reps=2 if smoke else 20, warmup=1 if smoke else 3,
                             device=device)
        entry = {"B": B, "context": context, **shape, "dtype": str(dtype), "kv_bytes": kv_bytes,
                 "max_abs_error": errors, "timing": timing.as_dict(), "peers_skipped": skipped,
                 "gb_per_s": {name: kv_bytes / (timing.time(name).median * 1e-3) / 1e9 for name in variants}}
        best_peer = "sdpa cudnn" if "sdpa cudnn" in variants else next(
            (name for name in peers if name in variants), "ours, 1 split")
        ratio = timing.ratio(best_peer, "ours")  # peer time / our time = our bandwidth / the peer's
        entry["bandwidth_vs_" + best_peer.replace(" ", "_")] = {**ratio.as_dict(),
                                                               "verdict": ratio.verdict(at_least=1.0)}
        report.append(entry)
        print(f"\ndecode B{B} ctx{context} ({entry['kv_bytes'] / 1e9:.2f} GB of K/V)\n{timing.table(baseline='ours')}")
        print("GB/s: " + ", ".join(f"{name} {gbs:.0f}" for name, gbs in entry["gb_per_s"].items())
              + f"   ours/{best_peer} bandwidth {ratio} ({ratio.verdict(at_least=1.0)} at >= 1.0)")
        del q, k_cache, v_cache, tables, lens, k, v
        _free()
    return report


def sweep_kernel() -> list[dict]:
    """Tile sizes and split counts at B64 ctx4096 (to choose decode_config's defaults from measurements)."""
    B, context = KERNEL_CASES[0]
    q, k_cache, v_cache, tables, lens, k, _ = kernel_inputs(B, context, H=32, H_kv=8, D=128, block_size=16,
                                                            device=torch.device("cuda"), dtype=torch.bfloat16)
    kv_bytes = 2 * k.numel() * k.element_size()
    del k
    variants = {}
    for config in SWEEP:
        for splits in (1, 2):
            name = f"block_n={config.block_n} warps={config.num_warps} stages={config.num_stages} splits={splits}"
            variants[name] = (lambda config=config, splits=splits: paged_decode_attention(
                q, k_cache, v_cache, tables, lens, num_splits=splits, config=config))
    timing = interleaved(variants, rounds=3, reps=10, warmup=2, device="cuda")
    rows = sorted(({"variant": name, "ms": timing.time(name).median,
                    "gb_per_s": kv_bytes / (timing.time(name).median * 1e-3) / 1e9} for name in variants),
                  key=lambda row: row["ms"])
    best = "\n".join(f"  {row['variant']}: {row['gb_per_s']:.0f} GB/s" for row in rows[:5])
    print(f"\nsweep at B64 ctx4096 (best 5):\n{best}")
    del q, k_cache, v_cache, tables, lens
    _free()
    return rows


# -----------------------------------------------------------------------------
# 2. Serving


def llama(*, smoke: bool, dtype: torch.dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048)
    config.bos_token_id = config.eos_token_id = None  # no stop token: every request runs to its max_tokens
    config.pad_token_id = 0
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


@torch.inference_mode()
def hf_generate(model, requests: list[tuple[list[int], int]], batch_size: int) -> list[list[int]]:
    """The peer as a user would call it: static batches, left-padded, each run to its longest requested output."""
    outputs = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        width = max(len(prompt) for prompt, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        new = max(count for _, count in chunk)
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        outputs += [out[row, width:width + count].tolist() for row, (_, count) in enumerate(chunk)]
    return outputs


def engine_generate(llm: LLM, requests: list[tuple[list[int], int]]) -> list:
    params = [SamplingParams(temperature=0.0, max_tokens=count) for _, count in requests]
    return llm.generate([prompt for prompt, _ in requests], params)


def bench_serving(*, smoke: bool, rounds: int) -> dict:
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        workload = synthetic_workload(8, prompt_lens=(4, 16), output_lens=(4, 16), vocab_size=256, seed=0)
        batch_size, max_len, check_count, check_tokens = 4, 64, 4, 8
    else:
        workload = synthetic_workload(256, prompt_lens=(32, 512), output_lens=(32, 512), vocab_size=32000, seed=0)
        batch_size, max_len, check_count, check_tokens = 128, 1024, 16, 32
    report = {"num_requests": len(workload), "useful_output_tokens": sum(count for _, count in workload),
              "hf_batch_size": batch_size}
    backend = "torch" if smoke else "triton"

    # correctness first, in float32 (TF32 off): the engine's greedy tokens are HF generate's
    torch.backends.cuda.matmul.allow_tf32 = False
    model = llama(smoke=smoke, dtype=torch.float32, device=device)
    subset = [(prompt, min(count, check_tokens)) for prompt, count in workload[:check_count]]
    blocks = check_count * math.ceil(max_len / 16)
    llm = LLM(model, config=EngineConfig(block_size=16, num_blocks=blocks, max_num_seqs=check_count,
                                         max_model_len=max_len, attention_backend=backend))
    ours = [o.outputs[0].token_ids for o in engine_generate(llm, subset)]
    theirs = [hf_generate(model, [request], 1)[0] for request in subset]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    report["fp32_check"] = {"requests": check_count, "tokens_each": check_tokens, "mismatched": mismatches}
    print(f"\nfloat32 check: {check_count - len(mismatches)}/{check_count} requests identical to HF generate")
    if mismatches:
        print(f"  WARNING: requests {mismatches} differ from HF generate in float32")
    bf16 = model.to(torch.bfloat16)
    del llm, model
    _free()

    # throughput in bf16, interleaved rounds
    blocks = len(workload) * math.ceil(max_len / 16)
    config = dict(block_size=16, num_blocks=blocks, max_num_seqs=min(256, len(workload)), max_model_len=max_len,
                  max_num_batched_tokens=max(8192, max_len), attention_backend=backend)
    llm = LLM(bf16, config=EngineConfig(**config, cuda_graphs=not smoke))
    last = {}

    def run_engine():
        last["engine"] = engine_generate(llm, workload)

    def run_hf():
        last["hf"] = hf_generate(bf16, workload, batch_size)

    run_engine()  # warm-up: Triton compiles, every decode batch size captures its CUDA graph
    hf_generate(bf16, [(prompt, 4) for prompt, _ in workload[:2]], batch_size)
    timing = interleaved({"engine": run_engine, "hf generate": run_hf}, rounds=rounds, reps=1, warmup=0, device=device)
    useful = report["useful_output_tokens"]
    tok_s = {name: useful / (timing.time(name).median * 1e-3) for name in ("engine", "hf generate")}
    speedup = timing.ratio("hf generate", "engine")
    engine_tokens = [o.outputs[0].token_ids for o in last["engine"]]
    agree = [a == b for a, b in zip(engine_tokens, last["hf"])]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) / len(a)
              for a, b in zip(engine_tokens, last["hf"])]
    report.update({
        "timing": timing.as_dict(), "useful_tok_per_s": tok_s,
        "speedup_vs_hf": {**speedup.as_dict(), "verdict": speedup.verdict(at_least=10.0)},
        "bf16_identical_requests": sum(agree), "bf16_mean_matching_prefix": sum(prefix) / len(prefix),
        "engine_metrics": summarize([o.metrics for o in last["engine"]]),
        "engine_config": config, "preemptions": llm.engine.num_preemptions,
    })
    print(f"\nserving {len(workload)} requests ({useful} useful output tokens)\n{timing.table(baseline='engine')}")
    print(f"useful tok/s: engine {tok_s['engine']:.0f}, HF generate {tok_s['hf generate']:.0f}; "
          f"engine / HF {speedup} ({speedup.verdict(at_least=10.0)} at >= 10x)")
    print(f"bf16 greedy: {sum(agree)}/{len(agree)} requests identical to HF, mean matching prefix "
          f"{100 * report['bf16_mean_matching_prefix']:.1f}%")
    del llm
    _free()

    # what CUDA graphs buy: the same engine, eager, timed once
    eager = LLM(bf16, config=EngineConfig(**config, cuda_graphs=False))
    engine_generate(eager, workload[:4])
    start = time.perf_counter()
    engine_generate(eager, workload)
    _sync(device)
    seconds = time.perf_counter() - start
    report["engine_eager_tok_per_s"] = useful / seconds
    print(f"engine without CUDA graphs: {useful / seconds:.0f} useful tok/s (one run)")
    del eager
    _free()
    return report


# -----------------------------------------------------------------------------
# Helpers


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    kernel = results["kernel"]
    names = list(kernel[0]["gb_per_s"])
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        axes[0].bar([i + index * width for i in range(len(kernel))], [case["gb_per_s"][name] for case in kernel],
                    width, label=name)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(kernel))])
    axes[0].set_xticklabels([f"B{c['B']} ctx{c['context']}" for c in kernel])
    axes[0].set_ylabel("GB/s of K/V read")
    axes[0].set_title("decode attention")
    axes[0].legend(fontsize=8)
    serving = results.get("serving")
    if serving:
        labels = ["HF generate", "engine (eager)", "engine (CUDA graphs)"]
        values = [serving["useful_tok_per_s"]["hf generate"], serving["engine_eager_tok_per_s"],
                  serving["useful_tok_per_s"]["engine"]]
        axes[1].bar(labels, values, color=["gray", "tab:orange", "tab:blue"])
        axes[1].set_ylabel("useful output tokens/s")
        axes[1].set_title(f"serving {serving['num_requests']} requests")
    fig.suptitle(f"lab08 on {results['environment'].get('gpu') or 'CPU (smoke)'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
