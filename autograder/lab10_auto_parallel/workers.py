"""Producers and rank functions of lab 10's tests.

A case names a function of the lab and its keyword arguments as plain data; `call` rebuilds the lab's objects
(ModelConfig, ParallelPlan, Workload, profiles) inside the worker, calls the function and returns plain data: numbers,
lists, dicts (dataclasses become dicts), or "ErrorType: message" when the function raised. The distributed producers
start ranks with common.launch.run_distributed; each rank trains with run_plan and returns losses, times or counted
bytes. Nothing here imports the lab at module level.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from common.launch import run_distributed
from common.testing import corpus_batch, tiny_model

TIMEOUT_S = 240.0
LR = 1e-3


# -----------------------------------------------------------------------------
# Plain data in, plain data out


def _build(name: str, value):
    """Turn a plain-data argument into the lab's object, by the argument's name."""
    if name == "config":
        from common.model import ModelConfig

        return ModelConfig(**value)
    if name == "plan":
        from lab10_auto_parallel.cost_model import ParallelPlan

        return ParallelPlan(**value)
    if name == "workload":
        from lab10_auto_parallel.cost_model import Workload

        return Workload(**value)
    if name == "cluster":
        from lab10_auto_parallel.profiles import load_profile

        value = dict(value)
        return load_profile(value.pop("name"), **value)
    if name == "link":
        from lab10_auto_parallel.profiles import Link

        return Link(**value)
    return value


def _plain(value):
    """Numbers, strings, lists and dicts; a dataclass becomes a dict of its fields (and `total` when it has one)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if hasattr(value, "total") and "total" not in out:
            out["total"] = float(value.total)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def call(cases: list[dict]) -> list:
    """Each case {"module": "cost_model", "fn": "step_time", "args": [...], "kwargs": {...}}: its result, or the
    error's "Type: message"."""
    import importlib

    out = []
    for case in cases:
        module = importlib.import_module(f"lab10_auto_parallel.{case['module']}")
        fn = getattr(module, case["fn"])
        kwargs = {name: _build(name, value) for name, value in case.get("kwargs", {}).items()}
        args = [_build(name, value) for name, value in case.get("args", [])]
        try:
            out.append(_plain(fn(*args, **kwargs)))
        except NotImplementedError:
            raise  # a stub: reported as not implemented, not as a wrong value
        except Exception as error:  # noqa: BLE001
            out.append(f"{type(error).__name__}: {error}")
    return out


def plan_result(config: dict, cluster: dict, workload: dict, memory_cap: float | None, num_devices: int | None):
    """plan_training's result as plain data: best plan, cost, memory, flops per device and the table; or the
    error's "Type: message"."""
    from lab10_auto_parallel.planner import plan_training

    try:
        result = plan_training(_build("config", config), _build("cluster", cluster),
                               workload=_build("workload", workload), memory_cap=memory_cap, num_devices=num_devices)
    except NotImplementedError:
        raise  # a stub: reported as not implemented, not as a wrong value
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return {"best": _plain(result.best), "cost": _plain(result.cost), "memory": _plain(result.memory),
            "flops_per_device": result.flops_per_device, "table": result.table(),
            "rejected": [{"plan": _plain(c.plan), "reason": c.reason,
                          "step_s": None if c.cost is None else c.cost.total,
                          "memory": None if c.memory is None else c.memory.total} for c in result.rejected]}


# -----------------------------------------------------------------------------
# Intra-operator: the layer's optimum


def layer_choice(config: dict, batch_size: int, seq_len: int, tp: int, cluster: dict) -> list[str]:
    """The strategy names solve_intra_op picks on layer_problem (a producer: runs in the worker)."""
    from lab10_auto_parallel.cost_model import Workload
    from lab10_auto_parallel.intra_op import layer_problem, solve_intra_op

    problem = layer_problem(_build("config", config), batch_size=batch_size, seq_len=seq_len, tp=tp,
                            cluster=_build("cluster", cluster), workload=Workload(global_batch=batch_size,
                                                                                  seq_len=seq_len))
    choice, _ = solve_intra_op(problem.node_costs, problem.edges)
    return [problem.strategies[v][i].name for v, i in enumerate(choice)]


# -----------------------------------------------------------------------------
# Training under plans (world 4)


def train_plans(plans: list[dict], *, world_size: int, num_layers: int, batch_size: int, seq_len: int,
                steps: int, seed: int) -> list:
    """For each plan: every rank's losses (a list per rank), or the error of the first rank that raised."""
    return run_distributed(_train_rank, world_size=world_size, timeout_s=TIMEOUT_S,
                           args=(plans, num_layers, batch_size, seq_len, steps, seed))


def _train_rank(info, plans, num_layers, batch_size, seq_len, steps, seed):
    from lab10_auto_parallel.cost_model import ParallelPlan
    from lab10_auto_parallel.execute import run_plan

    out = []
    for plan in plans:
        model = tiny_model(num_layers=num_layers, seed=seed)
        batches = [corpus_batch(batch_size=batch_size, seq_len=seq_len, seed=seed + step) for step in range(steps)]
        try:
            out.append(run_plan(ParallelPlan(**plan), model, batches, lr=LR).losses)
        except NotImplementedError:
            raise  # a stub: reported as not implemented, not as a wrong value
        except Exception as error:  # noqa: BLE001
            out.append(f"{type(error).__name__}: {error}")
    return out


# -----------------------------------------------------------------------------
# Memory: predicted against counted


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (the test's own count: None and freed storages add 0)."""
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return int(sum(sizes.values()))


def memory_states(plans: list[dict], *, world_size: int, num_layers: int, batch_size: int, seq_len: int) -> list:
    """Per plan, per rank: {"predicted": memory_per_device's params/grads/optimizer, "counted": the bytes of the
    parameters, gradients and optimizer state this rank holds after one step} (fp32 model: 4-byte elements)."""
    return run_distributed(_memory_rank, world_size=world_size, timeout_s=TIMEOUT_S,
                           args=(plans, num_layers, batch_size, seq_len))


def _memory_rank(info, plans, num_layers, batch_size, seq_len):
    from lab10_auto_parallel.cost_model import ParallelPlan, Workload
    from lab10_auto_parallel.execute import run_plan
    from lab10_auto_parallel.memory_model import memory_per_device

    out = []
    for plan in plans:
        model = tiny_model(num_layers=num_layers, seed=0, dtype=torch.float32)
        config = model.config
        result = run_plan(ParallelPlan(**plan), model, [corpus_batch(batch_size=batch_size, seq_len=seq_len)])
        # lab 05's engines keep an fp32 master shard beside Adam's m and v (12 bytes); torch's AdamW only m and v
        optimizer_bytes = 12 if plan.get("zero_stage", 0) else 8
        workload = Workload(global_batch=batch_size, seq_len=seq_len, param_bytes=4, grad_bytes=4,
                            optimizer_bytes=optimizer_bytes, activation_bytes=4)
        predicted = memory_per_device(config, ParallelPlan(**plan), workload=workload)
        if result.engine is not None:
            engine = result.engine
            params = [p for g in engine.groups for p in g.params]
            counted = {"params": _storage_bytes([*params, *(g.shard for g in engine.groups)]),
                       "grads": _storage_bytes([*(p.grad for p in params), *(g.grad for g in engine.groups)]),
                       "optimizer": _storage_bytes(engine.optimizer.state_tensors())}
        else:
            params = list(result.module.parameters())
            # gradients are freed after the step (set_to_none): a step holds one gradient per parameter at its peak
            counted = {"params": _storage_bytes(params), "grads": _storage_bytes(params),
                       "optimizer": _storage_bytes([t for s in result.optimizer.state.values() for t in s.values()
                                                    if t.dim() > 0])}
        out.append({"predicted": {k: float(getattr(predicted, k)) for k in ("params", "grads", "optimizer")},
                    "counted": counted})
    return out


def activations_counted(cases: list[dict]) -> list:
    """For each case {config, batch_size, seq_len, checkpointing}: the bytes autograd saves in one forward of the
    loss (parameters and RoPE tables excluded), the bytes one block saves, and activation_memory's prediction for
    a plan of one device, m = 1."""
    from common.model import ModelConfig, Transformer
    from lab10_auto_parallel.cost_model import ParallelPlan, Workload
    from lab10_auto_parallel.execute import checkpoint_blocks
    from lab10_auto_parallel.memory_model import activation_memory

    out = []
    for case in cases:
        torch.manual_seed(0)
        config = ModelConfig(**case["config"])
        model = Transformer(config)
        if case["checkpointing"]:
            checkpoint_blocks(model)
        tokens, targets = corpus_batch(batch_size=case["batch_size"], seq_len=case["seq_len"])
        tokens, targets = tokens % config.vocab_size, targets % config.vocab_size
        excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved: dict[int, int] = {}

        def pack(tensor):
            address = tensor.untyped_storage().data_ptr()
            if address not in excluded:
                saved[address] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model.loss(tokens, targets)
        forward_bytes = sum(saved.values())
        saved.clear()
        block = model.blocks[0]
        x = torch.randn(case["batch_size"], case["seq_len"], config.width, requires_grad=True)
        cos, sin = model.rope_cos[:case["seq_len"]], model.rope_sin[:case["seq_len"]]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            type(block).forward(block, x, cos, sin)
        block_bytes = sum(saved.values())
        del loss
        workload = Workload(global_batch=case["batch_size"], seq_len=case["seq_len"], activation_bytes=4)
        plan = ParallelPlan(checkpointing=case["checkpointing"])
        out.append({"forward": forward_bytes, "block": block_bytes,
                    "predicted": float(activation_memory(config, plan, workload=workload))})
    return out


# -----------------------------------------------------------------------------
# Step time: predicted against measured


def timed_plans(cases: list[dict], *, repeats: int) -> list:
    """For each case {plan, num_layers, batch_size, seq_len}: the step time step_time predicts on the cpu-gloo
    profile, and the median measured step (run_plan's steps after the first, over `repeats` steps)."""
    from lab10_auto_parallel.cost_model import ParallelPlan, Workload, step_time
    from lab10_auto_parallel.profiles import load_profile

    out = []
    for case in cases:
        plan = ParallelPlan(**case["plan"])
        model = tiny_model(num_layers=case["num_layers"], seed=0, dtype=torch.float32)
        workload = Workload(global_batch=case["batch_size"], seq_len=case["seq_len"], param_bytes=4, grad_bytes=4,
                            optimizer_bytes=8, activation_bytes=4)
        cluster = load_profile("cpu-gloo").with_devices(plan.world_size)
        predicted = step_time(model.config, plan, workload=workload, cluster=cluster).total
        times = run_distributed(_timed_rank, world_size=plan.world_size, timeout_s=TIMEOUT_S,
                                args=(case, repeats))
        step = statistics.median(max(rank[i] for rank in times) for i in range(1, repeats + 1))
        out.append({"predicted": predicted, "measured": step})
    return out


def _timed_rank(info, case, repeats):
    from lab10_auto_parallel.cost_model import ParallelPlan
    from lab10_auto_parallel.execute import run_plan

    model = tiny_model(num_layers=case["num_layers"], seed=0, dtype=torch.float32)
    batch = corpus_batch(batch_size=case["batch_size"], seq_len=case["seq_len"])
    began = time.perf_counter()
    result = run_plan(ParallelPlan(**case["plan"]), model, [batch] * (repeats + 1))
    assert time.perf_counter() - began >= sum(result.step_times) * 0.99
    return result.step_times
