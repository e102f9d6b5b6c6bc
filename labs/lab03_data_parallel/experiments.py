"""Experiments for the lab notebook and the lecture deck: rank functions that spawned processes can import.

`common.launch.run_distributed` starts fresh processes that import their worker by module path, so a function
defined in a notebook cell cannot be a worker. These live here, call the lab's own modules (the student's code in
labs/, the reference in reference/), and return plain Python data (numbers and lists, never tensors: tensors put
on a multiprocessing queue travel as shared-memory handles that die with the rank that sent them).

    from common.launch import run_distributed
    from lab03_data_parallel.experiments import time_all_reduce
    rows = run_distributed(time_all_reduce, world_size=2, args=([2**10, 2**16, 2**20],))[0]
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from common.data import get_batch, load_corpus
from common.measure import time_fn
from common.model import ModelConfig, Transformer

from .collectives import ring_all_reduce
from .ddp_bucketed import BucketConfig, BucketedDDP
from .ddp_naive import NaiveDDP, shard_batch


def time_all_reduce(info, sizes_bytes: list[int], repeats: int = 5) -> list[dict]:
    """Median seconds of our ring all-reduce and of dist.all_reduce for fp32 messages of each size."""
    rows = []
    for nbytes in sizes_bytes:
        x = torch.randn(max(1, nbytes // 4))
        row = {"bytes": nbytes}
        for name, fn in (("ring", lambda: ring_all_reduce(x)), ("torch", lambda: dist.all_reduce(x))):
            dist.barrier()
            row[name] = time_fn(fn, warmup=1, repeats=repeats, device="cpu").median_ms / 1e3
        rows.append(row)
    return rows


def train_losses(info, wrapper: str, steps: int, global_batch: int, seed: int = 0) -> list[float]:
    """Loss per step of the tiny model trained with SGD: wrapper "single" (this rank, whole batch), "naive" or
    "bucketed" (each rank B/p rows of the same global batch). Returns the global mean loss of each step."""
    torch.manual_seed(seed + info.rank)
    model = Transformer(ModelConfig.preset("tiny"))
    if wrapper == "naive":
        ddp = NaiveDDP(model)
        sync = ddp.sync_gradients
    elif wrapper == "bucketed":
        ddp = BucketedDDP(model, config=BucketConfig(bucket_cap_mb=0.05))
        sync = ddp.finish
    else:
        torch.manual_seed(seed)  # rank 0's initial weights, as the broadcast would give
        model, sync = Transformer(ModelConfig.preset("tiny")), None
    corpus = load_corpus(max_tokens=100_000)
    losses = []
    for step in range(steps):
        tokens, targets = get_batch(corpus, batch_size=global_batch, seq_len=64, seed=1000 + step)
        if sync is not None:
            tokens, targets = shard_batch(tokens, targets, rank=info.rank, world_size=info.world_size)
        loss = model.loss(tokens, targets)
        loss.backward()
        if sync is not None:
            sync()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= info.world_size
        with torch.no_grad():  # plain SGD (torch.optim's first step costs seconds of imports per rank)
            for param in model.parameters():
                param -= 0.5 * param.grad
                param.grad = None
        losses.append(loss.item())
    return losses


def bucket_timeline(info, cap_mb: float, num_layers: int = 6) -> dict:
    """One logged backward of bucketed DDP: the event log with times relative to the start of backward (ms)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("small", num_layers=num_layers))
    ddp = BucketedDDP(model, config=BucketConfig(bucket_cap_mb=cap_mb, record_events=True))
    tokens, targets = get_batch(load_corpus(max_tokens=50_000), batch_size=4, seq_len=128, seed=info.rank)
    loss = model.loss(tokens, targets)
    start = time.perf_counter()
    loss.backward()
    backward_end = time.perf_counter()
    ddp.finish()
    finish_end = time.perf_counter()
    return {
        "events": [(kind, detail, (t - start) * 1e3) for kind, detail, t in ddp.events],
        "backward_ms": (backward_end - start) * 1e3, "finish_ms": (finish_end - start) * 1e3,
        "num_buckets": ddp.num_buckets,
    }


def fault_demo(info, store_address, victim: int, die_at_call: int, calls: int) -> list[dict]:
    """Each rank all-reduces its rank+1 `calls` times; the victim dies (os._exit) at call `die_at_call`."""
    from .fault_tolerant import FaultToleranceConfig, FaultTolerantAllReduce

    store = dist.TCPStore(store_address[0], store_address[1], is_master=False)
    reducer = FaultTolerantAllReduce(store, rank=info.rank, world_size=info.world_size,
                                     config=FaultToleranceConfig(grace_s=0.5))
    rows = []
    for call in range(calls):
        if info.rank == victim and call == die_at_call:
            os._exit(3)
        start = time.perf_counter()
        value = reducer.all_reduce(torch.tensor([float(info.rank + 1)]))
        rows.append({"call": call, "sum": value.item(), "members": list(reducer.members),
                     "ms": (time.perf_counter() - start) * 1e3})
    return rows
