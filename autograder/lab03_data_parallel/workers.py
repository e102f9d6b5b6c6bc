"""Rank functions for lab 03's distributed tests.

Spawned ranks import their worker by module path, so workers live here (importable as
`autograder.lab03_data_parallel.workers`) and not in the test files. Each worker imports the code under test inside
the function, from whichever tree the autograder put first on sys.path (spawned ranks inherit the parent's sys.path).
A worker returns plain data (CPU tensors, lists, strings); the test process makes the comparisons, so failure messages
come from `check_close` with the inputs described.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from common.data import get_batch, load_corpus
from common.model import ModelConfig, Transformer
from common.testing import random_tensor

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter")

# -----------------------------------------------------------------------------
# Shared by tests and workers


def ring_cases(world_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes that divide unevenly by the world size, including fewer elements than ranks."""
    return [((1,), torch.float32), ((world_size + 1,), torch.float64), ((13, 5), torch.float32),
            ((1003,), torch.float32), ((3, 7, 11), torch.float64)]


def ring_input(shape: tuple[int, ...], dtype: torch.dtype, *, case: int, rank: int, seed: int) -> torch.Tensor:
    return random_tensor(*shape, dtype=dtype, seed=seed * 10_000 + case * 100 + rank)


def make_model(*, seed: int, num_layers: int = 2, tie: bool = True, frozen: bool = True, unused: bool = True
               ) -> Transformer:
    """A tiny fp32 model with a tied embedding, a frozen norm weight and a parameter that no forward uses."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny", num_layers=num_layers, max_seq_len=32, tie_embeddings=tie))
    if frozen:
        model.blocks[0].attn_norm.weight.requires_grad_(False)
        with torch.no_grad():  # a frozen weight that is not all ones, so a wrong update would show
            model.blocks[0].attn_norm.weight.mul_(1.5)
    if unused:
        model.unused_head = nn.Linear(8, 3, bias=False)  # registered last: the first bucket in reverse order
    return model


def global_batch(*, batch_size: int, step: int, seed: int, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return get_batch(load_corpus(max_tokens=20_000), batch_size=batch_size, seq_len=seq_len, seed=seed * 100 + step)


@torch.no_grad()
def sgd_step(model: nn.Module, lr: float = 0.5) -> None:
    """Plain SGD, then clear the gradients. (torch.optim's first step imports torch._dynamo: seconds per rank.)"""
    for param in (p for p in model.parameters() if p.grad is not None):
        param -= lr * param.grad
        param.grad = None


def _cpu_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def _cpu_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


class _NoCollectives:
    """Inside: every torch.distributed collective raises, so only send/recv (isend/irecv) remain."""

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

        def forbidden(name):
            def call(*args, **kwargs):
                raise RuntimeError(f"the ring collectives must be built from send/recv only, but called dist.{name}")
            return call

        for name in self.saved:
            setattr(dist, name, forbidden(name))
        return self

    def __exit__(self, *exc):
        for name, function in self.saved.items():
            setattr(dist, name, function)


# -----------------------------------------------------------------------------
# Ring collectives


def ring_worker(info, seed: int) -> dict:
    """Every ring collective on every case, next to torch's own collective on the same inputs."""
    from lab03_data_parallel.collectives import ring_all_gather, ring_all_reduce, ring_reduce_scatter

    rank, world = info.rank, info.world_size
    out: dict = {"cases": []}
    for case, (shape, dtype) in enumerate(ring_cases(world)):
        x = ring_input(shape, dtype, case=case, rank=rank, seed=seed).to(info.device)
        expected = x.clone()
        dist.all_reduce(expected)
        numel = x.numel()
        bounds = [(int(c[0]), int(c[0]) + c.numel()) if c.numel() else (0, 0) for c in
                  torch.arange(numel).tensor_split(world)]
        start = sum(b[1] - b[0] for b in bounds[:rank])
        stop = start + bounds[rank][1] - bounds[rank][0]
        shard = x.reshape(-1)[start:stop].clone()
        # torch's all_gather needs equal sizes: gather shards padded to the largest chunk, then trim
        longest = max(b[1] - b[0] for b in bounds)
        padded = torch.zeros(longest, dtype=dtype, device=info.device)
        padded[: shard.numel()] = shard
        gathered = [torch.empty(longest, dtype=dtype, device=info.device) for _ in bounds]
        dist.all_gather(gathered, padded)
        gathered = [g[: b[1] - b[0]] for g, b in zip(gathered, bounds)]
        with _NoCollectives():
            summed = ring_all_reduce(x.clone())
            averaged = ring_all_reduce(x.clone(), op="avg")
            # a non-contiguous view must be reduced in place too
            strided = x.clone().reshape(x.shape[0], -1).t() if x.dim() > 1 else x.clone()
            ring_all_reduce(strided)
            scattered = ring_reduce_scatter(x)
            full = ring_all_gather(shard, numel=numel)
            untouched = x.clone()
        out["cases"].append({
            "shape": shape, "dtype": str(dtype), "input_kept": bool(torch.equal(x, untouched)),
            "all_reduce": (summed.cpu(), expected.cpu()),
            "all_reduce avg": (averaged.cpu(), (expected / world).cpu()),
            "all_reduce non-contiguous": (strided.t().reshape(shape).cpu() if x.dim() > 1 else strided.cpu(),
                                          expected.cpu()),
            "reduce_scatter": (scattered.cpu(), expected.reshape(-1)[start:stop].cpu()),
            "all_gather": (full.cpu(), torch.cat(gathered).cpu()),
        })
    # a shard of the wrong size is refused before any message is sent (every rank raises, so none waits)
    try:
        ring_all_gather(torch.ones(3, device=info.device), numel=100 * world + 1)
        out["bad_shard"] = "no error"
    except ValueError as error:
        out["bad_shard"] = f"ValueError: {error}"
    return out


def ring_subgroup_worker(info, seed: int) -> list:
    """Two subgroups (even and odd ranks) run ring all-reduces at the same time: peers must be global ranks."""
    from lab03_data_parallel.collectives import ring_all_reduce

    evens = dist.new_group([r for r in range(info.world_size) if r % 2 == 0])
    odds = dist.new_group([r for r in range(info.world_size) if r % 2 == 1])
    mine = evens if info.rank % 2 == 0 else odds
    x = random_tensor(37, seed=seed + info.rank).to(info.device)
    expected = x.clone()
    dist.all_reduce(expected, group=mine)
    with _NoCollectives():
        got = ring_all_reduce(x.clone(), group=mine)
    return [got.cpu(), expected.cpu()]


# -----------------------------------------------------------------------------
# Data-parallel training


def ddp_train_worker(info, variants: list[str], steps: int, seed: int, local_batch: int = 2) -> dict:
    """Train each variant ("naive" or "bucketed:<cap MB>") for `steps` SGD steps, and the single-process model on
    the concatenated batch; replicas start from different seeds, so the broadcast is tested too."""
    from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP
    from lab03_data_parallel.ddp_naive import NaiveDDP, shard_batch

    rank, world = info.rank, info.world_size
    out: dict = {}
    for variant in variants:
        model = make_model(seed=seed + rank).to(info.device)  # different on every rank until the broadcast
        if variant == "naive":
            ddp = NaiveDDP(model, group=None)
            sync = ddp.sync_gradients
        else:
            cap = float(variant.split(":")[1])
            ddp = BucketedDDP(model, group=None, config=BucketConfig(bucket_cap_mb=cap))
            sync = ddp.finish
            out[f"{variant} buckets"] = [list(b) for b in ddp.bucket_indices]
        out[f"{variant} initial"] = _cpu_params(ddp.module)
        for step in range(steps):
            tokens, targets = global_batch(batch_size=local_batch * world, step=step, seed=seed)
            tokens, targets = shard_batch(tokens, targets, rank=rank, world_size=world)
            ddp.module.loss(tokens.to(info.device), targets.to(info.device)).backward()
            sync()
            if step == steps - 1:
                out[f"{variant} grads"] = _cpu_grads(ddp.module)
            sgd_step(ddp.module)
        out[f"{variant} params"] = _cpu_params(ddp.module)
    # the single-process reference on the same device: rank 0's initial model, the whole batch
    reference = make_model(seed=seed).to(info.device)
    for step in range(steps):
        tokens, targets = global_batch(batch_size=local_batch * world, step=step, seed=seed)
        reference.loss(tokens.to(info.device), targets.to(info.device)).backward()
        if step == steps - 1:
            out["reference grads"] = _cpu_grads(reference)
        sgd_step(reference)
    out["reference params"] = _cpu_params(reference)
    out["reference initial"] = _cpu_params(make_model(seed=seed))
    return out


def mismatch_worker(info) -> dict:
    """Rank 1's model is narrower: NaiveDDP must raise ValueError on every rank (none may hang in the broadcast)."""
    from lab03_data_parallel.ddp_naive import NaiveDDP

    out = {}
    for name, wrapper in (("NaiveDDP", NaiveDDP),):
        torch.manual_seed(0)
        width = 64 if info.rank != 1 else 32
        model = Transformer(ModelConfig.preset("tiny", width=width, max_seq_len=32)).to(info.device)
        try:
            wrapper(model, group=None)
            out[name] = "no error"
        except ValueError as error:
            out[name] = f"ValueError: {error}"
    return out


def overlap_worker(info, cap_mb: float) -> dict:
    """One bucketed backward with the event log on; dist.all_reduce is wrapped to record how many gradients were
    ready (by hooks of the test's own) each time it was called."""
    calls: list[tuple[int, float]] = []
    ready: list[str] = []
    original = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        calls.append((len(ready), time.perf_counter()))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = recording_all_reduce  # before importing the lab, so `from ... import all_reduce` sees it too
    try:
        from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP

        model = make_model(seed=1, num_layers=4, frozen=False, unused=False).to(info.device)
        ddp = BucketedDDP(model, group=None, config=BucketConfig(bucket_cap_mb=cap_mb, record_events=True))
        calls.clear()
        names = {id(p): n for n, p in model.named_parameters()}
        for param in ddp.module.parameters():
            param.register_post_accumulate_grad_hook(lambda p: ready.append(names[id(p)]))
        tokens, targets = global_batch(batch_size=2 * info.world_size, step=0, seed=1)
        ddp.module.loss(tokens.to(info.device), targets.to(info.device)).backward()
        calls_during_backward = list(calls)
        backward_end = time.perf_counter()
        ddp.finish()
    finally:
        dist.all_reduce = original
    return {
        "events": [(kind, detail) for kind, detail, *_ in ddp.events],
        "event_times": [t for *_, t in ddp.events],
        "num_buckets": ddp.num_buckets,
        "num_params": len(ready),
        "calls_during_backward": calls_during_backward,
        "backward_end": backward_end,
        "last_param": ready[-1] if ready else None,
    }


def no_sync_worker(info, num_microbatches: int, iterations: int, seed: int) -> dict:
    """Accumulate num_microbatches micro-batches per iteration (all but the last inside no_sync()); compare with the
    single-process large batch. Also counts all-reduce calls made inside no_sync()."""
    calls = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP
        from lab03_data_parallel.ddp_naive import shard_batch

        rank, world = info.rank, info.world_size
        local = 2 * num_microbatches
        ddp = BucketedDDP(make_model(seed=seed + rank).to(info.device), group=None,
                          config=BucketConfig(bucket_cap_mb=0.02))
        out: dict = {"calls_inside_no_sync": []}
        for iteration in range(iterations):
            tokens, targets = global_batch(batch_size=local * world, step=iteration, seed=seed)
            tokens, targets = shard_batch(tokens.to(info.device), targets.to(info.device), rank=rank, world_size=world)
            pieces = list(zip(tokens.chunk(num_microbatches), targets.chunk(num_microbatches)))
            calls.clear()
            with ddp.no_sync():
                for micro_tokens, micro_targets in pieces[:-1]:
                    (ddp.module.loss(micro_tokens, micro_targets) / num_microbatches).backward()
            out["calls_inside_no_sync"].append(len(calls))
            (ddp.module.loss(*pieces[-1]) / num_microbatches).backward()
            ddp.finish()
            out[f"grads {iteration}"] = _cpu_grads(ddp.module)
            sgd_step(ddp.module)
    finally:
        dist.all_reduce = original
    reference = make_model(seed=seed).to(info.device)
    for iteration in range(iterations):
        tokens, targets = global_batch(batch_size=local * world, step=iteration, seed=seed)
        tokens, targets = tokens.to(info.device), targets.to(info.device)
        loss = reference.loss(tokens, targets)
        loss.backward()
        out[f"reference grads {iteration}"] = _cpu_grads(reference)
        sgd_step(reference)
    return out


def partly_unused_worker(info, steps: int, seed: int) -> dict:
    """Only rank 0's loss uses `unused_head`: its hook fires on rank 0 and never on the others, so the ranks fill
    their buckets in different orders (rank 0 during backward, the others in finish()) and must still agree."""
    from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP
    from lab03_data_parallel.ddp_naive import shard_batch

    def local_loss(model, tokens, targets, rank):
        loss = model.loss(tokens, targets)
        if rank == 0:
            features = model.embed(tokens)[..., :8]  # (B, N, 8)
            loss = loss + model.unused_head(features).pow(2).mean()
        return loss

    rank, world = info.rank, info.world_size
    ddp = BucketedDDP(make_model(seed=seed + rank).to(info.device), group=None,
                      config=BucketConfig(bucket_cap_mb=0.01))
    reference = make_model(seed=seed).to(info.device)
    out: dict = {}
    for step in range(steps):
        tokens, targets = global_batch(batch_size=2 * world, step=step, seed=seed)
        tokens, targets = tokens.to(info.device), targets.to(info.device)
        local_loss(ddp.module, *shard_batch(tokens, targets, rank=rank, world_size=world), rank).backward()
        ddp.finish()
        out[f"grads {step}"] = _cpu_grads(ddp.module)
        sgd_step(ddp.module)
        # the single-process equivalent: the mean over ranks of each rank's loss on its shard
        total = sum(local_loss(reference, *shard_batch(tokens, targets, rank=r, world_size=world), r)
                    for r in range(world)) / world
        total.backward()
        out[f"reference grads {step}"] = _cpu_grads(reference)
        sgd_step(reference)
    return out


# -----------------------------------------------------------------------------
# Fault tolerance (run_distributed with may_die and pass_store: the victim rank really dies)


def fault_worker(info, store_address, victim: int, die_at_call: int, calls: int, seed: int) -> list:
    """Every rank calls all_reduce `calls` times; the victim calls os._exit at the start of call `die_at_call`."""
    from lab03_data_parallel.fault_tolerant import FaultToleranceConfig, FaultTolerantAllReduce

    host, port = store_address
    store = dist.TCPStore(host, port, is_master=False)
    reducer = FaultTolerantAllReduce(store, rank=info.rank, world_size=info.world_size,
                                     config=FaultToleranceConfig(detect_timeout_s=10.0, grace_s=2.0))
    results = []
    for call in range(calls):
        if info.rank == victim and call == die_at_call:
            os._exit(17)  # no cleanup, no goodbye: the sockets just close
        x = random_tensor(5, 3, dtype=torch.float64, seed=seed * 1000 + call * 10 + info.rank)
        start = time.perf_counter()
        got = reducer.all_reduce(x.clone())
        results.append({"got": got, "members": list(reducer.members), "seconds": time.perf_counter() - start})
    return results


def check_fault_run(results: list, *, victim: int, die_at_call: int, calls: int, seed: int) -> None:
    """In the test process: survivors agree, members shrink at die_at_call, each result is the sum over members."""
    from common.testing import check_close, describe

    world_size = len(results)
    survivors = [r for r in range(world_size) if r != victim]
    assert results[victim] is None
    for rank in survivors:
        assert results[rank] is not None and len(results[rank]) == calls, f"rank {rank} did not finish {calls} calls"
        for call, result in enumerate(results[rank]):
            members = list(range(world_size)) if call < die_at_call else survivors
            inputs = describe(world_size=world_size, victim=victim, die_at_call=die_at_call, call=call, rank=rank)
            assert result["members"] == members, (
                f"FaultTolerantAllReduce.members after call {call} is {result['members']}, expected {members} "
                f"({inputs})")
            expected = sum(random_tensor(5, 3, dtype=torch.float64, seed=seed * 1000 + call * 10 + r) for r in members)
            check_close(result["got"], expected, name="FaultTolerantAllReduce.all_reduce (sum over the survivors)",
                        inputs=inputs)
            assert torch.equal(result["got"], results[survivors[0]][call]["got"]), (
                f"survivors disagree on the result of call {call} ({inputs})")


# -----------------------------------------------------------------------------
# NCCL (two GPUs)


def nccl_peer_worker(info, seed: int) -> dict:
    """On NCCL under bf16 autocast: ring all-reduce against NCCL's, and one step of naive and bucketed DDP against
    torch DDP (the peer), on a small model; gradients returned in fp32."""
    from lab03_data_parallel.collectives import ring_all_reduce
    from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP
    from lab03_data_parallel.ddp_naive import NaiveDDP

    out: dict = {}
    x = random_tensor(100_003, dtype=torch.bfloat16, seed=seed + info.rank).to(info.device)
    expected = x.clone()
    dist.all_reduce(expected)
    out["ring bf16"] = (ring_all_reduce(x.clone()).float().cpu(), expected.float().cpu())
    tokens, targets = global_batch(batch_size=4, step=info.rank, seed=seed, seq_len=128)
    tokens, targets = tokens.to(info.device), targets.to(info.device)
    for name in ("torch", "naive", "bucketed"):
        torch.manual_seed(seed)
        module = Transformer(ModelConfig.preset("small", tie_embeddings=True)).to(info.device)
        if name == "torch":
            model = torch.nn.parallel.DistributedDataParallel(module, device_ids=[info.local_rank])
        elif name == "naive":
            model = NaiveDDP(module, group=None)
        else:
            model = BucketedDDP(module, group=None, config=BucketConfig(bucket_cap_mb=1.0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        if name == "naive":
            model.sync_gradients()
        elif name == "bucketed":
            model.finish()
        out[name] = {n: p.grad.float().cpu() for n, p in module.named_parameters()}
    return out
