"""Benchmark: a LoRA fine-tuning step on a ~1B Llama, ours against peft, and QLoRA's weight memory (one GPU).

All in one run, on the same inputs, a HF LlamaForCausalLM built from a config (TinyLlama-1.1B's shape: d2048,
22 layers, GQA 32/4, F 5632, V 32000), bf16 weights, B8 N1024, sdpa attention; a step is forward, backward, AdamW
step and zero_grad:

    full        full fine-tuning (AdamW state in bf16, like the weights)
    peft        peft LoRA r16 alpha32 all-linear, as get_peft_model makes it (adapters upcast to fp32)
    peft-bf16   the same with autocast_adapter_dtype=False (bf16 adapters): splits peft's cost into dtype and rest
    ours        apply_lora r16 alpha32 all-linear (bf16 adapters, LoRAFunction: no dW0 GEMM, fused accumulate)
    qlora       ours on an NF4 base (apply_qlora)

1. Correctness first: on a small fp32 Llama on the same device, ours gives peft's logits and adapter gradients, and
   QLoRA gives the logits of the model whose weights are the dequantized NF4 ones.
2. Step time: every variant built first, then timed in interleaved rounds (common.bench; CUDA events). Peak memory of
   a step: the CUDA allocator's peak during a step above what was allocated before it, plus the variant's own
   weights and optimizer state. Weight bytes of every variant (NF4 at its packed size).
3. Memory arithmetic at scale: memory.predict_memory against measure_memory for full, ours, peft (fp32 adapters)
   and QLoRA.
4. Where peft's time goes: torch.profiler over two steps of peft and ours, CUDA time by kernel kind (GEMM, attention,
   elementwise and casts, reductions, other) and the top kernels.

Targets (docs/performance.md): ours at most 0.8x peft's step time at no more peak memory; QLoRA's weights at least 2.5x
smaller than the bf16 model's. Writes benchmark.json (and benchmark.png) into --out.

    PYTHONPATH=reference:labs python -m lab06_lora.benchmark --out results/
    PYTHONPATH=reference:labs python -m lab06_lora.benchmark --smoke         # seconds, on CPU, tiny model
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from common.bench import environment, interleaved
from common.testing import check_close

from .inject import apply_lora
from .lora import LoRAConfig
from .memory import LlamaShape, measure_memory, predict_memory
from .qlora import apply_qlora, is_nf4, nf4_bytes, weight_bytes

SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
          "smoke": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256)}
KINDS = (("attention", r"flash|fmha|attention|sdpa"),
         ("gemm", r"gemm|cutlass|xmma|cublas|nvjet|sm\d+_|matmul|aten::mm|aten::addmm|aten::bmm"),
         ("elementwise and casts", r"elementwise|vectorized|unrolled|copy|cast|mul|add|fill|silu"),
         ("reductions", r"reduce|norm|softmax|sum|mean"))


def build(kind: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[kind], max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def has_torchao() -> bool:
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # noqa: F401
    except ImportError:
        return False
    return True


def variants(base, lora: LoRAConfig) -> dict:
    """name -> model; the base itself is the full fine-tuning variant (QLoRA only when torchao is installed)."""
    from peft import LoraConfig, get_peft_model

    peft_config = dict(r=lora.r, lora_alpha=lora.alpha, target_modules="all-linear", lora_dropout=0.0)
    models = {"full": base,
              "peft": get_peft_model(copy.deepcopy(base), LoraConfig(**peft_config)),
              "peft-bf16": get_peft_model(copy.deepcopy(base), LoraConfig(**peft_config),
                                          autocast_adapter_dtype=False),
              "ours": apply_lora(copy.deepcopy(base), config=lora)}
    if has_torchao():
        models["qlora"] = apply_qlora(copy.deepcopy(base), config=lora)
    return models


def make_step(model, tokens: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def state_bytes(model, optimizer) -> int:
    """Weights (NF4 packed) and optimizer state of a variant: what it holds between steps."""
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return weight_bytes(model) + moments


def peak_step_bytes(step, model, optimizer, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before + state_bytes(model, optimizer)


# -----------------------------------------------------------------------------
# Correctness


def check_correctness(device: torch.device) -> dict:
    """Ours against peft (fp32, logits and every adapter gradient), QLoRA against the dequantized model."""
    from peft import LoraConfig, get_peft_model

    base = build("smoke", device, torch.float32)
    tokens = torch.randint(0, 256, (2, 64), device=device)
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    ours = apply_lora(copy.deepcopy(base), config=config)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():  # nonzero B, so the adapters matter
        for name, module in ours.named_modules():
            if hasattr(module, "lora_B") and isinstance(module.lora_B, torch.nn.Linear):
                other = peft.get_submodule(f"base_model.model.{name}")
                value = torch.randn(module.lora_B.weight.shape, generator=generator).to(device) * 0.1
                module.lora_B.weight.copy_(value)
                other.lora_B["default"].weight.copy_(value)
                other.lora_A["default"].weight.copy_(module.lora_A.weight)
    out_ours = ours(input_ids=tokens, labels=tokens)
    out_peft = peft(input_ids=tokens, labels=tokens)
    out_ours.loss.backward()
    out_peft.loss.backward()
    check_close(out_ours.logits, out_peft.logits, name="ours vs peft (logits)", rtol=1e-4, atol=1e-4)
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    grads_peft = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                  for n, p in peft.named_parameters() if p.grad is not None}
    if set(grads_ours) != set(grads_peft):
        raise RuntimeError(f"gradients reach different parameters: {sorted(set(grads_ours) ^ set(grads_peft))[:4]}")
    for name, grad in grads_ours.items():
        check_close(grad, grads_peft[name], name=f"ours vs peft (gradient of {name})", rtol=1e-3, atol=1e-5)

    if not has_torchao():
        print("torchao is not installed: the QLoRA variant is skipped (pip install torchao)")
        return {"max_logit_error_vs_peft": (out_ours.logits - out_peft.logits).abs().max().item()}
    bf16 = base.to(torch.bfloat16)
    qlora = apply_qlora(copy.deepcopy(bf16), config=config)
    dequantized = copy.deepcopy(bf16)
    with torch.no_grad():
        for name, module in qlora.named_modules():
            if isinstance(module, torch.nn.Linear) and is_nf4(module.weight):
                owner = name.removesuffix(".base_layer")
                dequantized.get_submodule(owner).weight.copy_(module.weight.to(torch.bfloat16))
        check_close(qlora(input_ids=tokens).logits, dequantized(input_ids=tokens).logits,
                    name="QLoRA vs the dequantized model (logits)", dtype=torch.bfloat16)
    return {"max_logit_error_vs_peft": (out_ours.logits - out_peft.logits).abs().max().item()}


# -----------------------------------------------------------------------------
# Profile: where the time goes


def profile(step, device: torch.device, steps: int = 2) -> dict:
    """CUDA (or CPU) time by kernel kind, kernels launched per step, and the top kernels, over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    step()
    with torch_profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    by_kind, kernels, count = defaultdict(float), defaultdict(float), 0
    for event in prof.key_averages():
        time_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if time_us <= 0 or (device.type == "cuda" and event.device_type.name != "CUDA"):
            continue
        name = event.key.lower()
        kind = next((k for k, pattern in KINDS if re.search(pattern, name)), "other")
        by_kind[kind] += time_us / 1e3 / steps
        kernels[event.key[:90]] += time_us / 1e3 / steps
        count += event.count
    top = sorted(kernels.items(), key=lambda item: -item[1])[:8]
    return {"ms_per_step_by_kind": dict(by_kind), "kernels_per_step": count / steps,
            "top_kernels_ms": {name: ms for name, ms in top}}


# -----------------------------------------------------------------------------
# The run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="directory for benchmark.json and benchmark.png")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CPU check of the script (tiny model)")
    args = parser.parse_args()
    if args.smoke:
        kind, device = "smoke", torch.device("cpu")
        args.batch_size, args.seq_len, args.rounds, args.reps = 2, 64, 2, 1
    elif torch.cuda.is_available():
        kind, device = "1b", torch.device("cuda")
    else:
        raise SystemExit("this benchmark needs a CUDA GPU; --smoke checks the script on CPU")

    correctness = check_correctness(device)
    print(f"correctness: ours = peft (max logit error {correctness['max_logit_error_vs_peft']:.1e}); "
          "QLoRA = the dequantized model")

    base = build(kind, device, torch.bfloat16)
    shape = LlamaShape.from_hf(base.config)
    tokens = torch.randint(0, shape.vocab_size, (args.batch_size, args.seq_len), device=device)
    lora = LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear")
    models = variants(base, lora)
    steps = {name: make_step(model, tokens) for name, model in models.items()}
    rows = {}
    for name, model in models.items():
        step, optimizer = steps[name]
        step()  # optimizer state exists from here on
        rows[name] = {"weight_bytes": weight_bytes(model), "peak_step_bytes": peak_step_bytes(step, model, optimizer,
                                                                                              device)}
    timing = interleaved({name: step for name, (step, _) in steps.items()}, rounds=args.rounds, reps=args.reps,
                         warmup=1, device=device)
    print(f"\n{kind} Llama ({sum(p.numel() for p in base.parameters()) / 1e9:.2f} B params), bf16, "
          f"B{args.batch_size} N{args.seq_len}, LoRA r{args.rank} all-linear, {environment().get('gpu') or 'CPU'}")
    print(timing.table(baseline="peft"))

    ratio = timing.ratio("ours", "peft")
    quantized = [p for p in models["qlora"].parameters() if is_nf4(p)] if "qlora" in models else []
    linear_bf16, linear_nf4 = sum(2 * p.numel() for p in quantized), sum(nf4_bytes(p) for p in quantized)
    weight_ratio = rows["full"]["weight_bytes"] / rows["qlora"]["weight_bytes"] if "qlora" in rows else None
    targets = {
        "ours_time_at_most_0.8x_peft": ratio.verdict(at_most=0.8),
        "ours_peak_at_most_peft": ("met" if rows["ours"]["peak_step_bytes"] <= rows["peft"]["peak_step_bytes"]
                                   else "missed"),
        "qlora_weights_at_least_2.5x_smaller": ("not measured (no torchao)" if "qlora" not in rows else
                                                "met" if weight_ratio >= 2.5 else "missed"),
    }
    print(f"\nours / peft step time: {ratio}x  -> target <= 0.8x: {targets['ours_time_at_most_0.8x_peft']}")
    for name, row in rows.items():
        print(f"{name:>10}: weights {row['weight_bytes'] / 2**30:6.2f} GiB, peak of a step "
              f"{row['peak_step_bytes'] / 2**30:6.2f} GiB")
    if quantized:
        print(f"QLoRA weights {weight_ratio:.2f}x smaller than bf16 (linear layers alone "
              f"{linear_bf16 / linear_nf4:.2f}x) -> target >= 2.5x: {targets['qlora_weights_at_least_2.5x_smaller']}")

    # memory arithmetic against a real step, at this scale
    arithmetic = {}
    for name, method, adapter_dtype in (("full", "full", None), ("ours", "lora", None),
                                        ("peft", "lora", torch.float32), ("qlora", "qlora", None)):
        if name not in models:
            continue
        config = None if method == "full" else LoRAConfig(r=lora.r, alpha=lora.alpha, target_modules="all-linear",
                                                          adapter_dtype=adapter_dtype)
        predicted = predict_memory(shape, method=method, batch_size=args.batch_size, seq_len=args.seq_len,
                                   config=config, device=device.type)
        measured = measure_memory(models[name], tokens)  # one more step in place (a copy would re-quantize NF4)
        arithmetic[name] = {"predicted": predicted.as_dict(), "measured": measured.as_dict()}
        print(f"memory arithmetic {name:>5}: predicted {predicted.total / 2**30:6.2f} GiB, measured "
              f"{measured.total / 2**30:6.2f} GiB (activations {predicted.activations / 2**30:.2f} vs "
              f"{measured.activations / 2**30:.2f})")
        gc.collect()

    profiles = {name: profile(steps[name][0], device) for name in ("peft", "peft-bf16", "ours")}
    for name, result in profiles.items():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(result["ms_per_step_by_kind"].items()))
        print(f"profile {name:>9}: {result['kernels_per_step']:.0f} kernels per step; ms per step: {kinds}")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": "lab06_lora.benchmark", "environment": environment(), "smoke": args.smoke,
                  "shape": SHAPES[kind], "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank,
                  "correctness": correctness, "timing": timing.as_dict(),
                  "ratios": {name: timing.ratio(name, "peft").as_dict() for name in models if name != "peft"},
                  "memory": rows, "qlora_weight_ratio": weight_ratio,
                  "qlora_linear_weight_ratio": linear_bf16 / linear_nf4 if quantized else None, "targets": targets,
                  "memory_arithmetic": arithmetic, "profile": profiles}
        (args.out / "benchmark.json").write_text(json.dumps(result, indent=1))
        plot(timing, rows, args.out / "benchmark.png")
        print(f"\nwrote {args.out / 'benchmark.json'}")


def plot(timing, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    left.bar(names, [timing.time(n).median for n in names],
             yerr=[[timing.time(n).median - timing.time(n).low for n in names],
                   [timing.time(n).high - timing.time(n).median for n in names]])
    left.set_ylabel("step time (ms)")
    right.bar(names, [rows[n]["peak_step_bytes"] / 2**30 for n in names], label="peak of a step")
    right.bar(names, [rows[n]["weight_bytes"] / 2**30 for n in names], label="weights")
    right.set_ylabel("GiB")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
