"""Pipeline schedules as pure functions, and a discrete-event simulation that measures their bubble and memory.

What it saves: a pipeline of p stages runs p micro-batches at once, one per stage. The order in which each rank
runs forwards (F) and backwards (B) decides how long ranks sit idle (the bubble) and how many micro-batches' activations
each rank keeps at once (its memory).

- GPipe (Huang et al. 2019, arXiv:1811.06965): every rank runs the m forwards, then the m backwards. Bubble
  (p-1)/(m+p-1) of the time; rank 0 holds all m micro-batches' activations at the peak.
- 1F1B (PipeDream-Flush; Narayanan et al. 2021, arXiv:2006.09503, and Megatron-LM, arXiv:2104.04473, Section 2.2):
  rank r runs min(p-r-1, m) warm-up forwards, then alternates one forward and one backward, then drains the
  remaining backwards. The same bubble (p-1)/(m+p-1), but rank r holds at most min(p-r, m) micro-batches: p, not m.
- Interleaved 1F1B (Narayanan et al. 2021, Section 2.2.2), the challenge: each rank holds v chunks of the model
  (virtual stages s = c p + r for chunk c on rank r), so a micro-batch crosses the ranks v times in smaller steps and
  the bubble shrinks to (p-1)/(v m + p-1) of the time. Needs m divisible by p.

A schedule is a list, one per rank, of `Action`s in the order that rank runs them. `simulate` replays it with fixed
durations (F takes forward_time, B backward_time, a chunk's share when interleaved) under the data dependencies

    F(i, s) after F(i, s-1)       B(i, s) after B(i, s+1)       B(i, s) after F(i, s)

and returns each rank's timeline, the bubble (idle fraction of the p x makespan rectangle) and the peak number of
micro-batches in flight (forward done, backward not yet) on each rank.

Usage:
    sim = simulate(one_f_one_b(4, 8))
    sim.bubble, sim.peak_in_flight          # 3/11, [4, 3, 2, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

# -----------------------------------------------------------------------------
# Actions and the theory


@dataclass(frozen=True)
class Action:
    """One unit of work: kind "F" or "B" of micro-batch `microbatch` through (virtual) stage `stage`."""

    kind: str
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f"@{self.stage}" if self.stage else "")


def bubble_fraction(num_stages: int, num_microbatches: int, num_chunks: int = 1) -> float:
    """The theory: (p-1) / (v m + p-1), the idle fraction of GPipe and 1F1B (v = 1) and of interleaved 1F1B."""
    return (num_stages - 1) / (num_chunks * num_microbatches + num_stages - 1)


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1 or num_microbatches < 1:
        raise ValueError(f"a schedule needs num_stages ({num_stages}) >= 1 and num_microbatches "
                         f"({num_microbatches}) >= 1")


# -----------------------------------------------------------------------------
# The schedules


def gpipe(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """GPipe: on rank r, F(0..m-1) through stage r, then B(0..m-1).

    Raises:
        ValueError: num_stages or num_microbatches < 1 (naming both).
    """
    _check_sizes(num_stages, num_microbatches)
    # BEGIN SOLUTION
    return [[Action("F", i, rank) for i in range(num_microbatches)] +
            [Action("B", i, rank) for i in range(num_microbatches)] for rank in range(num_stages)]
    # END SOLUTION


def one_f_one_b(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """1F1B: on rank r, w = min(p-r-1, m) warm-up forwards, then (F, B) pairs, then the w remaining backwards.

    Micro-batches go through each stage in order 0..m-1, forwards and backwards alike.

    Raises:
        ValueError: num_stages or num_microbatches < 1 (naming both).
    """
    _check_sizes(num_stages, num_microbatches)
    # BEGIN SOLUTION
    schedule = []
    for rank in range(num_stages):
        warmup = min(num_stages - rank - 1, num_microbatches)
        actions = [Action("F", i, rank) for i in range(warmup)]
        for i in range(num_microbatches - warmup):
            actions += [Action("F", warmup + i, rank), Action("B", i, rank)]
        actions += [Action("B", i, rank) for i in range(num_microbatches - warmup, num_microbatches)]
        schedule.append(actions)
    return schedule
    # END SOLUTION


def interleaved_one_f_one_b(num_stages: int, num_microbatches: int, num_chunks: int) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron-LM's virtual pipeline): rank r runs chunks c = 0..v-1, virtual stage c p + r.

    Forwards go in rounds of p micro-batches per chunk: micro-batches 0..p-1 through chunk 0, then through chunk 1,
    ..., then micro-batches p..2p-1 through chunk 0, and so on; backwards in the same order with the chunks
    reversed. Rank r first runs min((p-r-1) * 2 + (v-1) * p, v m) warm-up forwards, then alternates F and B.

    Raises:
        ValueError: sizes < 1, or m not divisible by p (naming both).
    """
    _check_sizes(num_stages, num_microbatches)
    if num_chunks < 1:
        raise ValueError(f"num_chunks ({num_chunks}) must be >= 1")
    if num_microbatches % num_stages:
        raise ValueError(f"interleaved 1F1B needs num_microbatches ({num_microbatches}) divisible by num_stages "
                         f"({num_stages})")
    # BEGIN SOLUTION
    p, v, total = num_stages, num_chunks, num_microbatches * num_chunks

    def unit(k: int, backward: bool) -> tuple[int, int]:
        """(micro-batch, chunk) of a rank's k-th forward (or backward)."""
        chunk = (k // p) % v
        return (k // (p * v)) * p + k % p, (v - 1 - chunk if backward else chunk)

    schedule = []
    for rank in range(p):
        warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
        actions = []
        for k in range(warmup):
            i, c = unit(k, False)
            actions.append(Action("F", i, c * p + rank))
        for k in range(total - warmup):
            i, c = unit(warmup + k, False)
            actions.append(Action("F", i, c * p + rank))
            i, c = unit(k, True)
            actions.append(Action("B", i, c * p + rank))
        for k in range(total - warmup, total):
            i, c = unit(k, True)
            actions.append(Action("B", i, c * p + rank))
        schedule.append(actions)
    return schedule
    # END SOLUTION


# -----------------------------------------------------------------------------
# The simulation


@dataclass
class Simulation:
    """timelines[r]: (start, end, action) in the order rank r ran them; makespan; bubble; peak_in_flight[r]."""

    timelines: list[list[tuple[float, float, Action]]]
    makespan: float
    bubble: float
    peak_in_flight: list[int]


def simulate(schedule: list[list[Action]], *, forward_time: float = 1.0, backward_time: float = 2.0) -> Simulation:
    """Replay `schedule` with fixed durations under the pipeline's data dependencies (see the module docstring).

    Virtual stage s runs on rank s % p; with v = (number of virtual stages) / p chunks per rank, an action takes
    1/v of forward_time or backward_time. Each rank starts its next action as soon as the rank is free and the
    action's dependencies have finished (communication is free).

    Returns:
        Simulation. bubble = 1 - (busy time of all ranks) / (p * makespan).

    Raises:
        ValueError: a schedule that misses or repeats an action, puts a stage on the wrong rank, or deadlocks (every
            rank waits for another); the message names the rank and the action it waits on.
    """
    num_ranks = len(schedule)
    if num_ranks < 1:
        raise ValueError("simulate: the schedule has no ranks")
    # BEGIN SOLUTION
    stages = {action.stage for actions in schedule for action in actions}
    num_stages = max(stages) + 1
    microbatches = {action.microbatch for actions in schedule for action in actions}
    num_microbatches = max(microbatches) + 1
    expected = {(kind, i, s) for kind in "FB" for i in range(num_microbatches) for s in range(num_stages)}
    seen = [(a.kind, a.microbatch, a.stage) for actions in schedule for a in actions]
    if num_stages % num_ranks or len(seen) != len(set(seen)) or set(seen) != expected:
        raise ValueError(f"simulate: the schedule must run F and B of each of {num_microbatches} micro-batches "
                         f"through each of {num_stages} stages exactly once, on {num_ranks} ranks")
    for rank, actions in enumerate(schedule):
        for action in actions:
            if action.stage % num_ranks != rank:
                raise ValueError(f"simulate: rank {rank} was given {action}, a stage that runs on rank "
                                 f"{action.stage % num_ranks}")
    chunks = num_stages // num_ranks
    duration = {"F": forward_time / chunks, "B": backward_time / chunks}
    finished: dict[tuple[str, int, int], float] = {}
    timelines: list[list[tuple[float, float, Action]]] = [[] for _ in range(num_ranks)]
    next_index, free_at = [0] * num_ranks, [0.0] * num_ranks
    while len(finished) < len(expected):
        progressed = False
        for rank in range(num_ranks):
            if next_index[rank] == len(schedule[rank]):
                continue
            action = schedule[rank][next_index[rank]]
            ready = _ready_time(action, finished, num_stages)
            if ready is None:
                continue
            start = max(ready, free_at[rank])
            end = start + duration[action.kind]
            timelines[rank].append((start, end, action))
            finished[(action.kind, action.microbatch, action.stage)] = end
            free_at[rank], next_index[rank] = end, next_index[rank] + 1
            progressed = True
        if not progressed:
            stuck = next(r for r in range(num_ranks) if next_index[r] < len(schedule[r]))
            raise ValueError(f"simulate: the schedule deadlocks: rank {stuck} waits to run "
                             f"{schedule[stuck][next_index[stuck]]} and no rank can make progress")
    makespan = max(free_at)
    busy = sum(end - start for timeline in timelines for start, end, _ in timeline)
    return Simulation(timelines=timelines, makespan=makespan, bubble=1.0 - busy / (num_ranks * makespan),
                      peak_in_flight=[_peak_in_flight(timeline) for timeline in timelines])
    # END SOLUTION


# -----------------------------------------------------------------------------
# Helpers


def _ready_time(action: Action, finished: dict, num_stages: int) -> float | None:
    """When the action's dependencies have all finished, or None if one has not run yet."""
    i, s = action.microbatch, action.stage
    if action.kind == "F":
        needs = [("F", i, s - 1)] if s > 0 else []
    else:
        needs = [("F", i, s)] + ([("B", i, s + 1)] if s < num_stages - 1 else [])
    if any(need not in finished for need in needs):
        return None
    return max((finished[need] for need in needs), default=0.0)


def _peak_in_flight(timeline: list[tuple[float, float, Action]]) -> int:
    """The most (micro-batch, stage) units whose forward has run and whose backward has not, on one rank."""
    in_flight = peak = 0
    for _, _, action in timeline:
        in_flight += 1 if action.kind == "F" else -1
        peak = max(peak, in_flight)
    return peak
