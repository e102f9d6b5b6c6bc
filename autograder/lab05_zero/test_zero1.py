"""Lab 05, part 2: ZeRO-1, optimizer state partitioning (zero1.py)."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

CASES = [  # (dtype, steps, lr, betas, eps, weight_decay)
    ("float64", 4, 1e-2, (0.8, 0.95), 1e-6, 0.1),
    ("float64", 3, 3e-3, (0.9, 0.999), 1e-8, 0.0),
    ("float32", 5, 1e-3, (0.5, 0.9), 1e-3, 0.3),
]

# -----------------------------------------------------------------------------
# Producers: run in the worker


def adamw_run(dtype: str, steps: int, lr: float, betas: tuple, eps: float, weight_decay: float, seed: int) -> dict:
    """adamw_step on a flat shard with fresh random gradients each step."""
    from lab05_zero.config import ZeROConfig
    from lab05_zero.zero1 import adamw_step

    config = ZeROConfig(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    param = random_tensor(37, seed=seed, dtype=getattr(torch, dtype))
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, steps + 1):
        grad = random_tensor(37, seed=seed + step, dtype=getattr(torch, dtype), scale=10.0 ** -step)
        adamw_step(param, grad, exp_avg, exp_avg_sq, step=step, config=config)
    return {"param": param, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def sharded_adamw_run(seed: int) -> dict:
    """ShardedAdamW over two shards of different sizes, bf16 gradients, three steps."""
    from lab05_zero.config import ZeROConfig
    from lab05_zero.zero1 import ShardedAdamW

    masters = [random_tensor(5, seed=seed), random_tensor(8, seed=seed + 1)]
    optimizer = ShardedAdamW(masters, ZeROConfig(lr=0.05, betas=(0.7, 0.8), eps=1e-4, weight_decay=0.2))
    returned = None
    for step in range(3):
        grads = [random_tensor(5, seed=seed + 10 + step, dtype=torch.bfloat16),
                 random_tensor(8, seed=seed + 20 + step, dtype=torch.bfloat16)]
        returned = optimizer.step(grads)
    return {"returned": [t.clone() for t in returned], "masters_in_place": [t.clone() for t in masters],
            "state": [t.clone() for t in optimizer.state_tensors()], "step_count": optimizer.step_count}


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _torch_adamw(param: torch.Tensor, grads: list, **options) -> dict:
    weight = torch.nn.Parameter(param.clone())
    optimizer = torch.optim.AdamW([weight], foreach=False, **options)
    for grad in grads:
        weight.grad = grad.to(weight.dtype)
        optimizer.step()
    state = optimizer.state[weight]
    return {"param": weight.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}


@pytest.mark.points(3)
@pytest.mark.parametrize("case", CASES)
def test_adamw_step_matches_torch(student, case):
    """adamw_step equals torch.optim.AdamW elementwise (weights and both moments) over several steps, with bias
    correction, decoupled weight decay (or none) and hyper-parameters away from the defaults."""
    dtype, steps, lr, betas, eps, weight_decay = case
    got = student.run(adamw_run, dtype, steps, lr, betas, eps, weight_decay, 7)
    grads = [random_tensor(37, seed=7 + step, dtype=getattr(torch, dtype), scale=10.0 ** -step)
             for step in range(1, steps + 1)]
    want = _torch_adamw(random_tensor(37, seed=7, dtype=getattr(torch, dtype)), grads, lr=lr, betas=betas, eps=eps,
                        weight_decay=weight_decay)
    inputs = describe(dtype=dtype, steps=steps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for key in ("param", "exp_avg", "exp_avg_sq"):
        check_close(got[key], want[key], name=f"adamw_step ({key})", inputs=inputs)


@pytest.mark.points(2)
def test_sharded_adamw_steps_every_shard(student):
    """ShardedAdamW.step updates every master shard in place with its (bf16) gradient upcast, returns the masters,
    counts its steps, and lists masters, m and v as its state."""
    got = student.run(sharded_adamw_run, 3)
    options = dict(lr=0.05, betas=(0.7, 0.8), eps=1e-4, weight_decay=0.2)
    wants = []
    for index, (numel, offset) in enumerate(((5, 10), (8, 20))):
        grads = [random_tensor(numel, seed=3 + offset + step, dtype=torch.bfloat16) for step in range(3)]
        wants.append(_torch_adamw(random_tensor(numel, seed=3 + index), grads, **options))
    for index, want in enumerate(wants):
        check_close(got["returned"][index], want["param"], name=f"ShardedAdamW.step return value (shard {index})")
        check_close(got["masters_in_place"][index], want["param"], name=f"ShardedAdamW: master shard {index} "
                    "updated in place")
    state = [w["param"] for w in wants] + [w["exp_avg"] for w in wants] + [w["exp_avg_sq"] for w in wants]
    assert len(got["state"]) == 6, f"ShardedAdamW.state_tensors() returned {len(got['state'])} tensors, expected 6"
    for index, (have, want) in enumerate(zip(got["state"], state)):
        check_close(have, want, name=f"ShardedAdamW.state_tensors()[{index}] (masters, then m, then v)")
    assert got["step_count"] == 3, f"ShardedAdamW.step_count after 3 steps is {got['step_count']}"


@pytest.mark.points(6)
@pytest.mark.time_limit(240)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_zero1_matches_single_process_and_ddp(student, world_size):
    """Three AdamW steps of ZeRO-1, two micro-batches each (gradient accumulation), on a model with a tied embedding,
    a frozen weight and a unit no world size divides, from different initial weights on each rank: the losses,
    parameters, master weights and logits equal single-process training on the whole batch, and torch DDP's."""
    from autograder.lab05_zero.workers import check_training, expected_training, train, train_local

    spec = {"config": {"stage": 1}, "steps": 3, "micro": 2, "seed": 21, "ddp": world_size == 2}
    if world_size == 1:
        results = [student.run(train_local, [spec], 1)[0]]
    else:
        results = student.run(train, [spec], world_size, timeout_s=200)[0]
    want = expected_training(steps=3, world_size=world_size, micro=2, seed=21)
    inputs = describe(stage=1, world_size=world_size, micro_batches=2, steps=3)
    check_training(results, want, name="ZeRO1", inputs=inputs)
    for rank, got in enumerate(results):
        if "ddp_params" in got:  # the expectation is DDP's result, or the grader is wrong
            for key, value in got["ddp_params"].items():
                check_close(value, want["params"][key], name=f"(grader check) torch DDP parameter {key}",
                            inputs=inputs)
