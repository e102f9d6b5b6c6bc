"""Continuous batching: which sequences run in the next model step, under a token budget and a finite KV cache.

What it saves: static batching (HF `generate`) runs a batch until its longest request ends, so finished rows idle and
new requests wait for the whole batch. Orca (Yu et al. 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models", OSDI) schedules one iteration at a time: after every step, finished sequences
leave and waiting ones join. vLLM (Kwon et al. 2023, arXiv:2309.06180, Section 4.5) adds the memory side: when the
cache runs out, the most recently admitted sequence is preempted and its blocks freed; it is later *recomputed* (one
prefill over its prompt and the tokens it already produced), which for small blocks is cheaper than swapping to CPU.

One step (`schedule`):
  1. decode: every running sequence gets one token, oldest first. One that needs a block when none is free preempts
     the newest running sequence (itself, if it is the newest) until a block is free;
  2. prefill: if nothing was preempted, waiting sequences join in arrival order (a preempted one goes back to the
     front: it arrived earlier) while the step's tokens stay within max_num_batched_tokens, the running sequences
     within max_num_seqs, and their blocks fit; the first that does not fit stops admission (first come, first served).

A prefill costs all its tokens in the budget (prefix-cached ones included: they are known only once allocated), a
decode one token. So every step computes at most max_num_batched_tokens tokens and never over-commits the cache.

Usage:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048), block_manager)
    scheduler.add(Sequence(seq_id=0, token_ids=prompt))
    step = scheduler.schedule()     # step.prefills, step.decodes, step.preempted, step.copies
    ... run the model, append the sampled tokens to the sequences ...
    scheduler.finish(sequence)      # a sequence that ended: its blocks are freed
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager

# -----------------------------------------------------------------------------
# Config and the unit of scheduling


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """max_num_seqs: running sequences at most. max_num_batched_tokens: tokens one step may compute (>= max_num_seqs,
    so every running sequence can decode in each step)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sequence of tokens being generated: its prompt, then every token sampled so far.

    num_cached_tokens: leading tokens whose K/V were found in the cache when it was last admitted (prefix caching);
    its prefill computes the rest. group_size: the running sequences it becomes once prefilled (the engine forks
    n - 1 copies for parallel sampling, then sets it to 1). The engine keeps its own per-request data in `request`.
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int = -1
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    group_size: int = 1
    request: object = None

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class ScheduledStep:
    """What one model step runs. copies: copy-on-write block copies to do before it."""

    prefills: list[Sequence] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens the step computes: each prefill's uncached tokens, one per decode."""
        return sum(s.num_tokens - s.num_cached_tokens for s in self.prefills) + len(self.decodes)


# -----------------------------------------------------------------------------
# The scheduler


class Scheduler:
    """FCFS continuous batching with preemption by recomputation (vLLM's policy).

    State: `waiting` (a deque, the next to admit first) and `running` (a deque, the oldest first).
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (it joins at the next step that has room)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Track a sequence that already holds blocks (a fork of a running sequence), newest of all."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        """Pick the next step's decodes and prefills (see the module docstring), reserving their cache slots.

        Decodes get their slot through block_manager.append_token (with the token they feed, the last one); the
        copies it asks for are collected in the step. Prefills get their blocks through block_manager.allocate, which
        sets num_cached_tokens.

        Returns:
            The step; scheduled sequences are RUNNING, preempted ones WAITING at the front of the queue.
        """
        step = ScheduledStep()
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: Scheduler.schedule is not implemented yet (lab08_serving/scheduler.py)")
        return step

    def finish(self, seq: Sequence) -> None:
        """A running sequence ended: free its blocks and stop scheduling it."""
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: Scheduler.finish is not implemented yet (lab08_serving/scheduler.py)")

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        """Preemption by recomputation: drop the sequence's blocks; it waits at the front to be prefilled again over
        all its tokens (prompt and output so far)."""
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: Scheduler._preempt is not implemented yet (lab08_serving/scheduler.py)")
