"""One harness to run a function on `world_size` processes: for tests, notebooks and benchmarks alike.

    results = run_distributed(worker, world_size=4, args=(config,), timeout_s=60)

starts 4 fresh processes, joins them in one process group through a TCP store that this process serves on a free port chosen by the OS (so two tests never race for a port), and runs
`worker(info, *args)` on each, where `info` is a `common.dist.DistInfo`. It returns the workers' return values in rank
order. The backend is NCCL when each rank can have its own GPU and gloo on CPU otherwise.

Failures are loud and bounded:
- a worker that raises: every rank is killed and `DistributedError` carries the first failing rank's traceback;
- a worker that dies (segfault, `os._exit`, `sys.exit`): the same, naming the rank and its exit code;
- a deadlock (say, one rank skips a collective): after `timeout_s`, every rank is killed and `DistributedTimeout`
  names the ranks that had not finished.

Fault-tolerance experiments (lab 03's Hoplite-style all-reduce) kill ranks on purpose: ranks in `may_die` may exit
without a result (theirs is None), and `pass_store=True` hands every worker the (host, port) of the TCP store this
process serves, which outlives every rank and so can serve the survivors as a side channel.

Results travel as `torch.save` bytes: a tensor put on a multiprocessing queue as is travels as a shared-memory handle,
which vanishes when its rank exits right after reporting.

Start and end are fenced, because gloo breaks when a peer leaves early (issue 8's flaky runs):
- **start**: after `init_process_group`, every rank waits on the store until every rank has finished it. Gloo connects
  each pair of ranks in the constructor, and a rank that returns from it first and exits at once (a rank that dies on
  purpose, or a quick worker) closed its sockets while a slower peer was still reading its handshake: that peer failed
  with "Gloo connectFullMesh failed ... Connection closed by peer" (2 runs in about 20 under two CPU hogs).
- **end**: a rank puts its result, flushes the queue, then waits on the store until every rank that must finish has
  finished its worker, so no rank tears down its sockets while a peer is still in a collective with it; it then
  destroys the process group and leaves with `os._exit`. Skipping the interpreter's shutdown skips the C++ static
  destructors that, racing gloo's and the store's background threads, aborted about 3% of runs at exit with
  "terminate called without an active exception" after their results were in.
The barriers use the launcher's TCP store, not gloo, so a dead rank (`may_die`) cannot hang them: the ranks wait only
for ranks that are not allowed to die, and never longer than the job's time limit.

Processes start from a fork server (Linux and macOS; plain spawn elsewhere): a clean process, started once per parent
process, that has imported torch and nothing else and forks a rank on request. Ranks inherit no thread and no CUDA
state, as with spawn, but skip importing torch: a world of 4 starts in about a tenth of spawn's time on a loaded
2-core machine (3 s against 29 s), which is most of a distributed test's cost. Each rank still receives the caller's
sys.path and imports its worker's module itself.

`worker` must be importable (defined at the top level of a module), because ranks import it by name.

`launcher="ray"` starts the same ranks as Ray Train workers across a Ray cluster's nodes instead (common/launch_ray.py).
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable, Collection

import torch
import torch.distributed as dist

from common.dist import DistInfo, pick_backend


EXIT_GRACE_S = 10.0  # after the last result, how long ranks may take to tear down before they are killed


class DistributedError(RuntimeError):
    """A rank raised or died; the message holds its traceback."""


class DistributedTimeout(DistributedError):
    """Some ranks did not finish within the time limit (a deadlock, or far too much work)."""


# -----------------------------------------------------------------------------
# Public entry point


def time_limit_scale() -> float:
    """$SLM_TIME_LIMIT_SCALE (default 1): the factor the grader's --time-limit-scale puts on every time limit."""
    value = os.environ.get("SLM_TIME_LIMIT_SCALE", "1")
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"SLM_TIME_LIMIT_SCALE must be a positive number, got {value!r}") from None
    if not scale > 0:
        raise ValueError(f"SLM_TIME_LIMIT_SCALE must be a positive number, got {value!r}")
    return scale


def run_distributed(
    worker: Callable[..., Any],
    *,
    world_size: int,
    args: tuple = (),
    backend: str = "auto",
    timeout_s: float = 60.0,
    may_die: Collection[int] = (),
    pass_store: bool = False,
    launcher: str = "local",
) -> list[Any]:
    """Run `worker(info, *args)` on `world_size` ranks and return their results, ordered by rank.

    Args:
        worker: a top-level function `(DistInfo, *args) -> picklable` (with pass_store, `(DistInfo, (host, port),
            *args)`).
        world_size: number of processes (>= 1).
        args: extra picklable arguments, the same for every rank.
        backend: "gloo", "nccl" or "auto" (NCCL when there is a GPU per rank).
        timeout_s: wall-clock limit for the whole job, multiplied by $SLM_TIME_LIMIT_SCALE when set (the grader sets
            it to its --time-limit-scale in the worker, so a distributed producer's limit stretches with its test's).
        may_die: ranks allowed to exit without returning; their result is None.
        pass_store: give each worker the address of the launcher's TCP store as its second argument.
        launcher: "local" (processes forked on this machine) or "ray" (Ray Train workers across a Ray cluster's
            nodes, one per GPU: common/launch_ray.py; not with may_die or pass_store).

    Raises:
        ValueError: bad world_size, backend or launcher.
        RuntimeError: NCCL requested without a GPU per rank.
        DistributedError / DistributedTimeout: as described in the module docstring.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    timeout_s *= time_limit_scale()
    if launcher == "ray":
        if may_die or pass_store:
            raise ValueError("may_die and pass_store need launcher='local' (Ray Train fails a job when a rank exits)")
        from common.launch_ray import run_distributed_ray

        return run_distributed_ray(worker, world_size=world_size, args=args, backend=backend, timeout_s=timeout_s)
    if launcher != "local":
        raise ValueError(f"launcher must be 'local' or 'ray', got {launcher!r}")
    if backend == "auto":
        backend = pick_backend(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'auto', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"NCCL needs one GPU per rank: world_size {world_size}, GPUs {torch.cuda.device_count()}")
    if not set(may_die) <= set(range(world_size)):
        raise ValueError(f"may_die ({sorted(may_die)}) must be ranks in [0, {world_size})")

    # The store's server lives in this process; port 0 lets the OS pick a free port with no race.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    if pass_store:
        args = (("127.0.0.1", store.port), *args)
    context = _context()
    results: mp.Queue = context.Queue()
    processes = [
        context.Process(
            target=_rank_main,
            args=(worker, args, rank, world_size, backend, store.port, timeout_s, sorted(may_die), results),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        values = _collect(processes, results, world_size, set(may_die), timeout_s)
        # every result is in: give the ranks a moment to pass the exit barrier (it needs the store alive) and leave
        deadline = time.monotonic() + EXIT_GRACE_S
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        return values
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
        results.close()
        del store


def _context():
    """A fork server that has imported torch (see the module docstring), or spawn where there is none."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed"])
    return context


# -----------------------------------------------------------------------------
# Parent side: wait for every rank, fail fast on the first error


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
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            continue
        if status == "error":
            raise DistributedError(f"rank {rank} of {world_size} raised:\n{payload}")
        for rank, process in enumerate(processes):
            # a rank that exited without reporting died hard (segfault, os._exit, killed)
            if rank in values or rank in dead or process.exitcode is None or not results.empty():
                continue
            time.sleep(0.2)  # its last message may still be in flight
            if not results.empty():
                break
            if rank not in may_die:
                raise DistributedError(
                    f"rank {rank} of {world_size} exited with code {process.exitcode} without returning a result"
                )
            dead.add(rank)  # died as the experiment planned
        if time.monotonic() > deadline:
            missing = [rank for rank in range(world_size) if rank not in values and rank not in dead]
            raise DistributedTimeout(
                f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s "
                "(a deadlock: does every rank call the same collectives in the same order?)"
            )
    return [values.get(rank) for rank in range(world_size)]


# -----------------------------------------------------------------------------
# Child side


def _rank_main(worker, args, rank, world_size, backend, port, timeout_s, may_die, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts (docs/gpu.md)
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    # the launcher's wall clock is the authority on time-outs (DistributedTimeout names the ranks that did not
    # finish); gloo's and the store's own limits stay behind it, so that under load a collective's own time-out does
    # not win the race and turn a deadlock into a rank's error
    timeout = datetime.timedelta(seconds=timeout_s + 60)
    code = 0
    try:
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        _store_barrier(store, "launch/started", rank, range(world_size), timeout)  # every pair is connected
        info = DistInfo(rank=rank, local_rank=rank, world_size=world_size, backend=backend, device=device)
        value = worker(info, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)  # bytes, not shared-memory handles (see the module docstring)
        _report(results, ("ok", rank, buffer.getvalue()))
        must_finish = [r for r in range(world_size) if r not in may_die]
        _store_barrier(store, "launch/finished", rank, must_finish, timeout)  # no peer is still talking to us
        dist.destroy_process_group()
    except BaseException:  # SystemExit included: a worker calling sys.exit is a failure, not a result
        code = 1
        try:
            _report(results, ("error", rank, traceback.format_exc()))
        except BaseException:
            pass
    finally:
        # skip the interpreter's shutdown: C++ destructors racing gloo's threads abort at exit (module docstring)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def _report(results: mp.Queue, message: tuple) -> None:
    """Put one message and wait until the queue's feeder thread has written it to the pipe (we leave by os._exit)."""
    results.put(message)
    results.close()
    results.join_thread()


def _store_barrier(store: dist.Store, name: str, rank: int, ranks, timeout: datetime.timedelta) -> None:
    """Mark this rank as arrived at `name`, then wait until every rank of `ranks` has."""
    store.set(f"{name}/{rank}", "1")
    keys = [f"{name}/{r}" for r in ranks]
    if keys:
        store.wait(keys, timeout)
