"""Lab 09, part 5: expert parallelism (expert_parallel.py): experts sharded over gloo ranks, tokens exchanged with
all_to_all_single, data parallelism for everything else.

Each producer starts world_size processes (common.launch.run_distributed, gloo on CPU); the rank functions below run
the student's code and return plain data. The grader computes the single-process answer with its own dense layer
(expected.py): the expert-parallel layer on rank r's tokens must equal the unsharded layer on those tokens, and the
gradients, summed over ranks (or held by each expert's owner), must equal the unsharded gradients.
"""

import pytest
import torch

from common.testing import check_all_close, check_close, describe, random_tensor

WIDTH, FFN, EXPERTS = 12, 10, 8
LAUNCH_TIMEOUT_S = 150.0


# -----------------------------------------------------------------------------
# Rank functions and producers: run in the worker (and in the processes it spawns)


def _layer_rank(info, weights: dict, config: dict, xs: list, seed: int, bad_num_experts: int | None) -> dict:
    from common.mesh import build_mesh
    from lab09_moe.expert_parallel import ExpertParallelMoE
    from lab09_moe.moe_layer import MoEConfig, MoELayer

    group = build_mesh(dp=info.world_size).dp_group  # the expert-parallel axis is the data-parallel one
    layer = MoELayer(WIDTH, MoEConfig(**config)).to(device=info.device, dtype=xs[0].dtype)  # cuda:rank under NCCL
    layer.load_state_dict({name: value.to(xs[0].dtype) for name, value in weights.items()})
    sharded = ExpertParallelMoE(layer, ep_group=group)
    x = xs[info.rank].to(info.device).requires_grad_(True)
    y = sharded(x)
    probe = random_tensor(*y.shape, dtype=y.dtype, seed=seed + info.rank).to(info.device)
    ((y * probe).sum() + 0.3 * sharded.aux_loss + 0.2 * sharded.z_loss).backward()
    out = {"y": y.detach().cpu(), "dx": x.grad.cpu(),
           "grads": {name: p.grad.cpu() for name, p in sharded.named_parameters()}}
    if bad_num_experts is not None:
        try:
            ExpertParallelMoE(MoELayer(WIDTH, MoEConfig(num_experts=bad_num_experts, top_k=1, ffn_width=4)),
                              ep_group=group)
            out["error"] = None
        except ValueError as error:
            out["error"] = str(error)
    return out


def ep_layer(weights: dict, config: dict, xs: list, seed: int, world_size: int,
             bad_num_experts: int | None = None) -> list:
    from common.launch import run_distributed

    return run_distributed(_layer_rank, world_size=world_size, args=(weights, config, xs, seed, bad_num_experts),
                           timeout_s=LAUNCH_TIMEOUT_S)


def _train_rank(info, state: dict, config: dict, tokens: torch.Tensor, targets: torch.Tensor, steps: int,
                lr: float) -> dict:
    from common.mesh import build_mesh
    from common.testing import tiny_model
    from lab09_moe.expert_parallel import apply_expert_parallel, sync_gradients
    from lab09_moe.moe_layer import MoEConfig
    from lab09_moe.moe_model import apply_moe, moe_loss

    group = build_mesh(dp=info.world_size).dp_group
    model = apply_moe(tiny_model(num_layers=2), config=MoEConfig(**config))
    model.load_state_dict(state)
    model = apply_expert_parallel(model.to(info.device), ep_group=group)
    local = tokens.shape[0] // info.world_size
    rows = slice(info.rank * local, (info.rank + 1) * local)
    tokens, targets = tokens[rows].to(info.device), targets[rows].to(info.device)
    first_grads, losses = None, []
    for _ in range(steps):
        loss, _ = moe_loss(model, tokens, targets)
        loss.backward()
        sync_gradients(model, group=group)
        losses.append(float(loss))
        if first_grads is None:
            first_grads = {name: p.grad.cpu() for name, p in model.named_parameters()}
        with torch.no_grad():
            for param in model.parameters():
                param -= lr * param.grad
                param.grad = None
    return {"grads": first_grads, "params": {name: p.detach().cpu() for name, p in model.named_parameters()},
            "losses": losses}


def ep_train(state: dict, config: dict, tokens: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
             world_size: int) -> list:
    from common.launch import run_distributed

    return run_distributed(_train_rank, world_size=world_size, args=(state, config, tokens, targets, steps, lr),
                           timeout_s=LAUNCH_TIMEOUT_S)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _single_process(weights: dict, xs: list, seed: int, **routing) -> tuple[list, dict]:
    """Each rank's tokens through the grader's unsharded layer (routing per rank, as each rank routes its own), and
    the gradients of the sum of the ranks' probe losses."""
    from autograder.lab09_moe.expected import DenseMoE

    layer = DenseMoE(weights, **routing)
    outputs = []
    total = 0.0
    for rank, x in enumerate(xs):
        leaf = x.double().clone().requires_grad_(True)
        y = layer(leaf)
        probe = random_tensor(*y.shape, dtype=torch.float64, seed=seed + rank)
        total = total + (y * probe).sum() + 0.3 * layer.aux + 0.2 * layer.z
        outputs.append((y, leaf))
    total.backward()
    grads = {"router.weight": layer.router.weight.grad, "w_gate_up": layer.w_gate_up.grad,
             "w_down": layer.w_down.grad}
    return [(y.detach(), leaf.grad) for y, leaf in outputs], grads


def _check_layer(results: list, weights: dict, xs: list, seed: int, *, what: str, routing: dict, dtype=None) -> None:
    expected, grads = _single_process(weights, xs, seed, **routing)
    world = len(xs)
    local = EXPERTS // world
    for rank, (out, (y, dx)) in enumerate(zip(results, expected)):
        inputs = describe(world_size=world, rank=rank, tokens=tuple(xs[rank].shape), **routing)
        check_close(out["y"], y, name=f"{what} (output on rank {rank})", inputs=inputs, dtype=dtype)
        check_close(out["dx"], dx, name=f"{what} (gradient of rank {rank}'s tokens)", inputs=inputs, dtype=dtype)
        shard = slice(rank * local, (rank + 1) * local)
        check_all_close(out["grads"], {"router.weight": out["grads"].get("router.weight"),
                                       "w_gate_up": grads["w_gate_up"][shard], "w_down": grads["w_down"][shard]},
                        name=f"{what} (rank {rank}'s expert gradients: experts {shard.start}..{shard.stop - 1})",
                        inputs=inputs, dtype=dtype)
    router = sum(out["grads"]["router.weight"] for out in results)
    check_close(router, grads["router.weight"], name=f"{what} (router gradient summed over the ranks)",
                inputs=describe(world_size=world), dtype=dtype)


TOKENS_PER_RANK = {1: [6], 2: [7, 3], 4: [5, 0, 9, 1]}


@pytest.mark.points(9)
@pytest.mark.time_limit(180)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_expert_parallel_layer_matches_one_process(student, world_size):
    """E = 8 experts over 1, 2 or 4 gloo ranks; uneven tokens per rank (5, 0, 9 and 1 at world size 4: one rank has
    no token, and the one-token rank sends nothing to 6 of the 8 experts). Outputs, input gradients, each owner's
    expert gradients and the summed router gradient equal the unsharded layer's. E = 3 (or 6 at world size 4) is
    refused with a ValueError on every rank."""
    from autograder.lab09_moe.expected import moe_weights

    weights = moe_weights(num_experts=EXPERTS, width=WIDTH, ffn_width=FFN, seed=world_size)
    xs = [random_tensor(n, WIDTH, dtype=torch.float64, seed=10 * world_size + r)
          for r, n in enumerate(TOKENS_PER_RANK[world_size])]
    config = dict(num_experts=EXPERTS, top_k=2, ffn_width=FFN, backend="torch")
    bad = None if world_size == 1 else (3 if world_size == 2 else 6)
    results = student.run(ep_layer, weights, config, xs, 40, world_size, bad)
    _check_layer(results, weights, xs, 40, what=f"ExpertParallelMoE at world size {world_size}",
                 routing=dict(top_k=2))
    if bad is not None:
        for rank, out in enumerate(results):
            assert out["error"] is not None and "divisible" in out["error"], (
                f"ExpertParallelMoE with {bad} experts over {world_size} ranks should raise ValueError('... must be "
                f"divisible by the expert-parallel size ...') on every rank; rank {rank} got: {out['error']}")


@pytest.mark.points(6)
@pytest.mark.time_limit(180)
def test_expert_and_data_parallel_training(student):
    """A 2-block MoE decoder (E = 4, top-2), expert-parallel over 2 ranks, each training on its half of the batch
    with moe_loss and sync_gradients: the gradients of the first step and the parameters after 2 SGD steps equal
    single-process training on the mean of the two halves' losses (aux and z losses included)."""
    from autograder.lab09_moe.expected import dense_moe_model, model_loss, model_state
    from common.testing import corpus_batch

    world, steps, lr = 2, 2, 0.5
    config = dict(num_experts=4, top_k=2, ffn_width=16, aux_loss_coef=0.1, z_loss_coef=0.01, backend="torch")
    state = model_state(num_layers=2, num_experts=4, ffn_width=16, seed=5)
    tokens, targets = corpus_batch(batch_size=2 * world, seq_len=8, seed=5)
    results = student.run(ep_train, state, config, tokens, targets, steps, lr, world)

    model = dense_moe_model(state, num_layers=2, top_k=2)
    first_grads = None
    for _ in range(steps):
        halves = zip(tokens.chunk(world), targets.chunk(world))
        loss = sum(model_loss(model, x, y, aux_loss_coef=0.1, z_loss_coef=0.01) for x, y in halves) / world
        loss.backward()
        if first_grads is None:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for param in model.parameters():
                param -= lr * param.grad
                param.grad = None
    params = {name: p.detach() for name, p in model.named_parameters()}
    for rank, out in enumerate(results):
        shard = slice(rank * 2, rank * 2 + 2)

        def local(table):
            return {name: value[shard] if name.endswith(("w_gate_up", "w_down")) else value
                    for name, value in table.items()}

        inputs = describe(world_size=world, rank=rank, local_batch=(2, 8), lr=lr)
        check_all_close(out["grads"], local(first_grads), name=f"EP + DP, rank {rank}: gradients after "
                        "sync_gradients at step 1", inputs=inputs)
        check_all_close(out["params"], local(params), name=f"EP + DP, rank {rank}: parameters after {steps} steps",
                        inputs=inputs)
