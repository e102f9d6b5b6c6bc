"""Challenge: an all-reduce that survives a rank dying mid-run, in the spirit of Hoplite.

What it saves: the job. A plain collective is all-or-nothing: when one rank dies, every other rank fails or hangs until
the timeout, and the whole job restarts from a checkpoint. Hoplite (Zhuang et al. 2021, "Hoplite: Efficient and
Fault-Tolerant Collective Communication for Task-Based Distributed Systems", SIGCOMM, arXiv:2002.05814) keeps a
reduction going when a participant fails: a directory service that outlives the workers records who holds what, and
the reduce completes over the objects that remain. This file does the same for a synchronous all-reduce on gloo.

Design (two planes):
- Control plane: a key-value store that outlives every rank (the TCP store served by the launcher, our "directory").
  Every decision is made once with `compare_set(key, "", proposal)`: the first proposal wins, everyone reads the winner,
  so survivors can never disagree.
- Data plane: a gloo process group per *view* (a list of member ranks), built straight from the store with
  `ProcessGroupGloo(PrefixStore(view key, store), index, size)`. `dist.new_group` cannot be used: it is a collective
  of the default group, and the dead rank would have to take part.

Protocol of call c, attempt a, in view V (every member calls `all_reduce` in the same order):
    1. launch an async all-reduce of a fresh copy of the input on V's group;
    2. poll: op done -> set done/c/a/rank, and once every member of V is done, propose "commit";
             op raised (a peer's socket closed) or no progress for detect_timeout_s -> propose "abort";
             a decision already exists -> follow it;
    3. commit: return the result (sum over V). abort: set alive/c/a/rank, wait until every member of V is alive or
       grace_s passes, propose members/c/a = the alive ranks, adopt the winning list (a rank left out raises),
       build the new view's group and retry (attempt a+1) with the original inputs.
A rank that contributed and then died is still counted if every member finished (commit needs every done key);
otherwise the survivors redo the reduction among themselves: the result is always the sum over exactly `members`.

Usage (each rank, with a store every rank can reach):
    reducer = FaultTolerantAllReduce(store, rank=rank, world_size=world_size)
    reducer.all_reduce(grad, op="avg")      # in place; averaged over reducer.members, the ranks that contributed
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class FaultToleranceConfig:
    """detect_timeout_s: no progress for this long presumes a member dead (a closed socket is noticed at once);
    grace_s: how long survivors wait for one another after an abort; op_timeout_s: gloo's own limit per operation;
    poll_s: how often the store is polled; max_attempts: views tried per call before giving up."""

    detect_timeout_s: float = 10.0
    grace_s: float = 1.0
    op_timeout_s: float = 30.0
    poll_s: float = 0.005
    max_attempts: int = 4

    def __post_init__(self) -> None:
        for name in ("detect_timeout_s", "grace_s", "op_timeout_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FaultToleranceConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.max_attempts < 1:
            raise ValueError(f"FaultToleranceConfig.max_attempts must be >= 1, got {self.max_attempts}")


# -----------------------------------------------------------------------------
# Public entry point


class FaultTolerantAllReduce:
    """All-reduce over the ranks still alive; members shrink when a rank dies.

    Args:
        store: a store every rank reaches and that outlives them (e.g. a TCPStore served by the launcher).
        rank: this process's rank in [0, world_size).
        world_size: the number of ranks at the start (all alive: the first view's group needs them all).
        config: timeouts.
        name: a namespace in the store, so several reducers can share one.

    Attributes:
        members: the ranks of the current view (sorted); the last result is the reduction over exactly these.
        log: (call, attempt, event, perf_counter seconds) for "start", "abort", "commit", "view".
    """

    def __init__(self, store: dist.Store, *, rank: int, world_size: int,
                 config: FaultToleranceConfig = FaultToleranceConfig(), name: str = "ft"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        self.store = dist.PrefixStore(f"lab03/{name}/", store)
        self.rank, self.config = rank, config
        self.members = list(range(world_size))
        self.log: list[tuple[int, int, str, float]] = []
        self._calls = 0
        self._abandoned: list = []  # groups with an unfinished op: kept alive, never waited on again
        self._group = self._make_group("initial")

    def all_reduce(self, tensor: torch.Tensor, *, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` in place over the surviving ranks and return it.

        Args:
            tensor: any shape, a CPU tensor (gloo); the same shape and dtype on every rank.
            op: "sum", or "avg" (divided by len(members), the number of ranks that contributed).

        Raises:
            ValueError: an unknown op.
            RuntimeError: this rank was presumed dead by the others, or max_attempts views all failed.
        """
        if op not in ("sum", "avg"):
            raise ValueError(f"op must be 'sum' or 'avg', got {op!r}")
        call = self._calls
        self._calls += 1
        # TODO (lab03): your code here
        raise NotImplementedError("lab03: FaultTolerantAllReduce.all_reduce is not implemented yet (lab03_data_parallel/fault_tolerant.py)")

    # -------------------------------------------------------------------------
    # Protocol steps

    def _attempt(self, tensor: torch.Tensor, call: int, attempt: int) -> torch.Tensor | None:
        """Steps 1-2: the reduction over the current view, or None when the view's decision is "abort"."""
        prefix = f"{call}/{attempt}/"
        # TODO (lab03): your code here
        raise NotImplementedError("lab03: FaultTolerantAllReduce._attempt is not implemented yet (lab03_data_parallel/fault_tolerant.py)")

    def _agree_on_survivors(self, call: int, attempt: int) -> None:
        """Step 3: register as alive, wait for the others (or grace_s), and adopt the one winning member list."""
        prefix = f"{call}/{attempt}/"
        # TODO (lab03): your code here
        raise NotImplementedError("lab03: FaultTolerantAllReduce._agree_on_survivors is not implemented yet (lab03_data_parallel/fault_tolerant.py)")

    # -------------------------------------------------------------------------
    # Store helpers

    def _make_group(self, view: str) -> dist.ProcessGroup:
        """A gloo group over `members`, rendezvousing through the store under a key unique to this view."""
        store = dist.PrefixStore(f"view/{view}/", self.store)
        timeout = datetime.timedelta(seconds=self.config.op_timeout_s)
        return dist.ProcessGroupGloo(store, self.members.index(self.rank), len(self.members), timeout)

    def _propose(self, key: str, value: str) -> str:
        """Atomically set `key` to `value` unless it is set; return the value that won."""
        return self.store.compare_set(key, "", value).decode()

    def _get(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _note(self, call: int, attempt: int, event: str) -> None:
        self.log.append((call, attempt, event, time.perf_counter()))
