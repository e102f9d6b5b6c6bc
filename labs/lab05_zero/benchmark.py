"""Benchmark: ZeRO stages 1-3 against FSDP2 (and DeepSpeed) on any number of GPUs; ZeRO-Offload on one GPU.

compare (default; torchrun, one process per GPU). GPT-2 size (common.model preset "gpt2", ~124 M parameters), bf16
    in flight with fp32 master weights and AdamW, B8 N1024 per GPU. Variants, all built first and then timed in
    interleaved rounds (common.bench.interleaved, CUDA events): ours ZeRO-1, ZeRO-2, ZeRO-3; FSDP2 (fully_shard on
    every block and the root, bf16 MixedPrecisionPolicy, torch's AdamW); DeepSpeed ZeRO-1/2/3 (bf16, torch's AdamW, no
    gradient clipping) when deepspeed imports. Correctness first: every variant trains three fp32 steps of a small
    model from the same weights on the same data, and the losses must agree to 1e-4. Reported per GPU: tokens/s and
    its ratio to FSDP2 (target: ZeRO-3 at least 0.9x, judged on the whole spread), the model-state bytes a rank holds
    after a step (CUDA allocator; ours against the ZeRO formula, target within 10%) and the peak of a step.

offload (--offload, one GPU). The largest model of a family (width 2048, GQA 16/4, F 5632, vocab 32000, ~45 M
    parameters a layer) that trains with our ZeRO-2 (bf16, B1 N1024) without and with offload, growing the depth
    until a step runs out of GPU memory (offload: or would need more than 80% of the host's memory); then the time of
    a step with and without offload, interleaved, at the largest depth both train.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=reference:labs torchrun --nproc_per_node 2 -m lab05_zero.benchmark --out results/
    PYTHONPATH=reference:labs python -m lab05_zero.benchmark --offload --out results/
    PYTHONPATH=reference:labs python -m lab05_zero.benchmark --smoke --out /tmp/lab05      # CPU, 2 gloo ranks
    PYTHONPATH=reference:labs python -m lab05_zero.benchmark --smoke --offload --out /tmp/lab05

The same peers through Accelerate (written to the JSON as `accelerate`): FullyShardedDataParallelPlugin(fsdp_version=2,
auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"], reshard_after_forward=True) and
DeepSpeedPlugin(zero_stage=k, offload_optimizer_device="cpu" or "none").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from common.bench import environment, interleaved
from common.dist import DistInfo, init_from_env
from common.model import ModelConfig, Transformer

from .config import ZeROConfig, apply_zero
from .memory import measure_memory, padded_num_params, zero_formula

ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ACCELERATE = {"fsdp2": "FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy='transformer_based_wrap', "
                       "transformer_cls_names_to_wrap=['Block'], reshard_after_forward=True, "
                       "mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))",
              "deepspeed": "DeepSpeedPlugin(zero_stage=k, offload_optimizer_device='none' | 'cpu') with "
                           "gradient_clipping 0 in its config (DeepSpeed clips at 1.0 by default)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--offload", action="store_true", help="the one-GPU offload measurement instead")
    parser.add_argument("--smoke", action="store_true", help="a short CPU check (tiny sizes, meaningless figures)")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--deepspeed", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--layers", type=int, nargs="+", default=[22, 44, 88, 132, 154, 176], help="offload depths")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch_size, args.seq_len, args.rounds, args.reps = "tiny", 2, 32, 2, 2
        args.layers = [1, 2]
    options = vars(args) | {"out": str(args.out)}
    if args.offload:
        result = _single_rank(offload_worker, options)
        name = "offload.json"
    elif args.smoke:
        from common.launch import run_distributed

        result = run_distributed(compare_worker, world_size=2, args=(options,), backend="gloo", timeout_s=600)[0]
        name = "compare.json"
    else:
        result = compare_worker(init_from_env(), options)
        name = f"compare_{dist.get_world_size()}gpu.json"
    if result is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result |= {"environment": environment(), "options": options, "accelerate": ACCELERATE}
        (args.out / name).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out / name}")


def _single_rank(worker, options: dict):
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device
                            if backend == "nccl" else None)
    try:
        return worker(DistInfo(rank=0, local_rank=0, world_size=1, backend=backend, device=device), options)
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# compare: ours against FSDP2 and DeepSpeed


def compare_worker(info: DistInfo, options: dict) -> dict | None:
    cuda = info.device.type == "cuda"
    use_deepspeed = options["deepspeed"] == "on" or (options["deepspeed"] == "auto" and cuda and _has_deepspeed())
    names = ["ours ZeRO-1", "ours ZeRO-2", "ours ZeRO-3", "FSDP2"]
    names += [f"DeepSpeed ZeRO-{stage}" for stage in (1, 2, 3)] if use_deepspeed else []
    losses = {name: _train_losses(name, info, ModelConfig.preset("tiny", num_layers=3), torch.float32, 3, 2, 32)
              for name in names}
    reference = torch.tensor(losses["FSDP2"])
    for name, values in losses.items():
        if not torch.allclose(torch.tensor(values), reference, rtol=1e-4, atol=1e-6):
            raise RuntimeError(f"{name} loses {values}, FSDP2 {reference.tolist()}: not the same training")
    _say(info, f"correctness: {len(names)} variants give the same fp32 losses over 3 steps {reference.tolist()}")

    config = ModelConfig.preset(options["preset"], max_seq_len=options["seq_len"])
    batch = _batch(info, config, options["batch_size"], options["seq_len"], seed=1)
    rows, steps = {}, {}
    for name in names:  # built one at a time: each one's memory is measured alone
        rows[name], steps[name] = _build_and_measure(name, info, config, batch)
    sync = None if cuda else dist.barrier
    timing = interleaved(steps, rounds=options["rounds"], reps=options["reps"], warmup=2, device=info.device,
                         sync=sync)
    tokens = options["batch_size"] * options["seq_len"]
    for name in names:  # the slowest rank's median decides, as a step waits for every rank
        median = torch.tensor(timing.time(name).median, dtype=torch.float64, device=info.device)
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
        rows[name]["step_ms"] = float(median)
        rows[name]["tokens_per_s_per_gpu"] = tokens / float(median) * 1e3
    ratio = timing.ratio("FSDP2", "ours ZeRO-3")  # FSDP2's time over ours: our throughput relative to FSDP2's
    verdict = ratio.verdict(at_least=0.9)
    if info.rank != 0:
        return None
    print(f"\n{config.num_layers} layers, width {config.width}, B{options['batch_size']} N{options['seq_len']} per GPU,"
          f" {info.world_size} ranks ({info.backend})")
    print(f"{'variant':<20}{'tokens/s/GPU':>14}{'state GiB':>11}{'formula GiB':>13}{'step peak GiB':>15}")
    for name, row in rows.items():
        formula = f"{row['formula_bytes'] / 2**30:13.3f}" if "formula_bytes" in row else f"{'-':>13}"
        print(f"{name:<20}{row['tokens_per_s_per_gpu']:14.0f}{row['state_bytes'] / 2**30:11.3f}{formula}"
              f"{row['peak_bytes'] / 2**30:15.3f}")
    print(timing.table(baseline="FSDP2"))
    print(f"ZeRO-3 throughput / FSDP2's: {ratio} -> target 0.9x {verdict}")
    memory_ok = {n: abs(r["state_bytes"] / r["formula_bytes"] - 1) <= 0.1 for n, r in rows.items() if
                 "formula_bytes" in r}
    print("state bytes within 10% of the formula:", memory_ok)
    return {"benchmark": "lab05_zero.benchmark compare", "world_size": info.world_size, "losses": losses,
            "variants": rows, "timing": timing.as_dict(), "zero3_over_fsdp2": ratio.as_dict(),
            "zero3_target_0.9x": verdict, "memory_within_10pct": memory_ok}


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def _batch(info: DistInfo, config: ModelConfig, batch_size: int, seq_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed * 1000 + info.rank)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
    return tokens[:, :-1].to(info.device), tokens[:, 1:].to(info.device)


def _build(name: str, info: DistInfo, config: ModelConfig, dtype: torch.dtype):
    """(loss function, backward, step) of one variant, on a model built from seed 0 on this rank's device."""
    torch.manual_seed(0)
    with torch.device(info.device):
        model = Transformer(config)
    if name.startswith("ours"):
        engine = apply_zero(model, config=ZeROConfig(stage=int(name[-1]), param_dtype=dtype, **ADAMW))
        return engine, engine.loss, lambda loss: loss.backward(), engine.step
    if name == "FSDP2":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = DeviceMesh.from_group(dist.group.WORLD, info.device.type)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(model, "loss")
        optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)

        def step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model, model.loss, lambda loss: loss.backward(), step
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}  # nothing JIT-compiled: torch's AdamW, torch's collectives
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": int(name[-1])}, "bf16": {"enabled": dtype == torch.bfloat16},
                 "optimizer": {"type": "AdamW", "params": {**ADAMW, "betas": list(ADAMW["betas"]),
                                                           "torch_adam": True, "adam_w_mode": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      dist_init_required=False)
    return engine, engine.module.loss, engine.backward, engine.step


def _train_losses(name, info, config, dtype, steps, batch_size, seq_len) -> list[float]:
    _, loss_fn, backward, step = _build(name, info, config, dtype)
    losses = []
    for index in range(steps):
        tokens, targets = _batch(info, config, batch_size, seq_len, seed=100 + index)
        loss = loss_fn(tokens, targets)
        backward(loss)
        step()
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        losses.append(float(total) / info.world_size)
    return losses


def _allocated(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _build_and_measure(name: str, info: DistInfo, config: ModelConfig, batch) -> tuple[dict, object]:
    """Build a variant, take one step, and measure what it holds (state) and the transient peak of a step."""
    cuda = info.device.type == "cuda"
    gc.collect()
    before = _allocated(info.device)
    wrapper, loss_fn, backward, step_fn = _build(name, info, config, torch.bfloat16)

    def step() -> None:
        backward(loss_fn(*batch))
        step_fn()
    step()
    buffers = sum(b.numel() * b.element_size() for b in _module(wrapper).buffers())
    state = _allocated(info.device) - before - buffers if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(info.device)
    start = _allocated(info.device)
    step()
    peak = (torch.cuda.max_memory_allocated(info.device) - start) if cuda else 0
    row = {"state_bytes": state, "peak_bytes": state + peak}
    if name.startswith("ours"):
        psi = padded_num_params(wrapper)
        row["formula_bytes"] = zero_formula(int(name[-1]), psi, info.world_size).device
        counted = measure_memory(wrapper)
        row["counted_bytes"] = counted.device
        if not cuda:
            row["state_bytes"] = row["counted_bytes"]  # no allocator to ask on CPU: count storages instead
            row["peak_bytes"] = row["state_bytes"] + getattr(wrapper, "peak_gathered_bytes", 0)
    return row, step


def _module(wrapper) -> torch.nn.Module:
    return getattr(wrapper, "module", wrapper)


def _say(info: DistInfo, text: str) -> None:
    if info.rank == 0:
        print(text, flush=True)


# -----------------------------------------------------------------------------
# offload: the largest model one GPU trains, with and without


def offload_worker(info: DistInfo, options: dict) -> dict:
    cuda = info.device.type == "cuda"
    width = 2048 if not options["smoke"] else 64
    family = dict(vocab_size=32000 if not options["smoke"] else 256, width=width, num_heads=16 if not options["smoke"]
                  else 4, num_kv_heads=4 if not options["smoke"] else 2, ffn_width=5632 if not options["smoke"] else
                  160, max_seq_len=options["seq_len"])
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    largest: dict[str, dict | None] = {"without offload": None, "with offload": None}
    attempts = []
    for label, offload in (("without offload", False), ("with offload", True)):
        for layers in options["layers"]:
            config = dataclasses.replace(ModelConfig(), num_layers=layers, **family)
            params = _count_params(config)
            if offload and 14 * params > 0.8 * host_bytes:  # K + 2 bytes a parameter on the host
                attempts.append({"mode": label, "layers": layers, "params": params, "ok": False,
                                 "why": "host memory (14 bytes a parameter over 80% of RAM)"})
                break
            outcome = _try_train(info, config, offload)
            attempts.append({"mode": label, "layers": layers, "params": params} | outcome)
            print(f"{label:>16}: {layers} layers, {params / 1e9:.2f} B parameters: "
                  f"{'trains' if outcome['ok'] else 'fails (' + outcome['why'] + ')'}", flush=True)
            if not outcome["ok"]:
                break
            largest[label] = {"layers": layers, "params": params, "peak_bytes": outcome["peak_bytes"]}
    cost = None
    if all(largest.values()):  # both engines alive at once for interleaved timing: the smallest depth
        config = dataclasses.replace(ModelConfig(), num_layers=options["layers"][0], **family)
        steps = {}
        for label, offload in (("without offload", False), ("with offload", True)):
            engine = _engine(info, config, offload)
            batch = _batch(info, config, 1, options["seq_len"], seed=3)
            steps[label] = lambda engine=engine, batch=batch: (engine.loss(*batch).backward(), engine.step())
        timing = interleaved(steps, rounds=options["rounds"], reps=options["reps"], warmup=1, device=info.device)
        ratio = timing.ratio("with offload", "without offload")
        print(timing.table(baseline="without offload"))
        cost = {"layers": config.num_layers, "params": _count_params(config), "timing": timing.as_dict(),
                "offload_over_plain": ratio.as_dict()}
        del steps, engine
    print("largest that trains:", {k: (v and f"{v['params'] / 1e9:.2f} B") for k, v in largest.items()})
    return {"benchmark": "lab05_zero.benchmark offload", "stage": 2, "batch": [1, options["seq_len"]],
            "host_bytes": host_bytes, "gpu_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
            "attempts": attempts, "largest": largest, "step_cost": cost}


def _count_params(config: ModelConfig) -> int:
    C, F, V, L = config.width, config.hidden_width, config.vocab_size, config.num_layers
    kv = config.num_kv_heads * config.head_dim
    per_layer = 2 * C * C + 2 * C * kv + 3 * C * F + 2 * C
    return L * per_layer + 2 * V * C + C


def _engine(info: DistInfo, config: ModelConfig, offload: bool):
    torch.manual_seed(0)
    with torch.device(info.device):
        model = Transformer(config)
    return apply_zero(model, config=ZeROConfig(stage=2, param_dtype=torch.bfloat16, offload=offload, **ADAMW))


def _try_train(info: DistInfo, config: ModelConfig, offload: bool) -> dict:
    """Two steps at this depth; out of memory is an answer, not an error."""
    cuda = info.device.type == "cuda"
    engine = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(info.device)
        engine = _engine(info, config, offload)
        tokens, targets = _batch(info, config, 1, config.max_seq_len, seed=2)
        for _ in range(2):
            engine.loss(tokens, targets).backward()
            engine.step()
        peak = torch.cuda.max_memory_allocated(info.device) if cuda else measure_memory(engine).device
        return {"ok": True, "peak_bytes": peak}
    except torch.OutOfMemoryError as error:
        return {"ok": False, "why": f"out of GPU memory: {str(error).splitlines()[0][:120]}"}
    finally:
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
