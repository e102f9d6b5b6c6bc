"""`run_distributed` for fault-tolerance experiments: chosen ranks may die, and the survivors' results still come back.

`common.launch.run_distributed` treats any rank that exits without a result as a failure of the whole job, which is
right for every test except the ones where a rank is *meant* to die (lab 03's fault-tolerant all-reduce kills one with
`os._exit`). This launcher reuses its rank entry point, and differs in two ways:

- ranks listed in `may_die` may exit without reporting; their result is None. Any other rank dying, any rank raising,
  or a timeout still fails the job, with the same errors (`DistributedError`, `DistributedTimeout`);
- the TCP store this process serves outlives every rank, so it doubles as the side channel survivors use to agree on
  what happened (Hoplite's directory service): `worker(info, store_address, *args)` receives its (host, port).

    results = run_distributed_with_failures(worker, world_size=4, may_die={2}, args=(...,), timeout_s=60)
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any, Callable, Collection

import torch.distributed as dist

from common.launch import DistributedError, DistributedTimeout, _rank_main


def run_distributed_with_failures(
    worker: Callable[..., Any],
    *,
    world_size: int,
    may_die: Collection[int],
    args: tuple = (),
    backend: str = "gloo",
    timeout_s: float = 60.0,
) -> list[Any]:
    """Run `worker(info, (host, port), *args)` on `world_size` ranks; ranks in `may_die` may exit without a result.

    Args:
        worker: a top-level function `(DistInfo, (host, port), *args) -> picklable`.
        world_size: number of processes (>= 1).
        may_die: ranks allowed to exit without returning (their result is None).
        args: extra picklable arguments, the same for every rank.
        backend: "gloo" (default: fault-tolerance experiments run on CPU) or "nccl".
        timeout_s: wall-clock limit for the whole job.

    Returns:
        The workers' results in rank order, None for a rank that died.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not set(may_die) <= set(range(world_size)):
        raise ValueError(f"may_die ({sorted(may_die)}) must be ranks in [0, {world_size})")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    address = ("127.0.0.1", store.port)
    context = mp.get_context("spawn")
    results: mp.Queue = context.Queue()
    processes = [
        context.Process(
            target=_rank_main,
            args=(worker, (address, *args), rank, world_size, backend, store.port, timeout_s, results),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        return _collect(processes, results, world_size, set(may_die), timeout_s)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
        results.close()
        del store


def _collect(processes: list, results: mp.Queue, world_size: int, may_die: set[int], timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    dead: set[int] = set()
    while len(values) + len(dead) < world_size:
        try:
            status, rank, payload = results.get(timeout=0.1)
        except queue.Empty:
            status = None
        if status == "ok":
            values[rank] = payload
            continue
        if status == "error":
            raise DistributedError(f"rank {rank} of {world_size} raised:\n{payload}")
        for rank, process in enumerate(processes):
            if rank in values or rank in dead or process.exitcode is None or not results.empty():
                continue
            time.sleep(0.2)  # its last message may still be in flight
            if not results.empty():
                break
            if rank in may_die:
                dead.add(rank)  # died as planned
            else:
                raise DistributedError(
                    f"rank {rank} of {world_size} exited with code {process.exitcode} without returning a result"
                )
        if time.monotonic() > deadline:
            missing = [rank for rank in range(world_size) if rank not in values and rank not in dead]
            raise DistributedTimeout(f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s")
    return [values.get(rank) for rank in range(world_size)]
