"""One timing method for every benchmark of the kit: interleaved rounds, medians with their spread, and targets judged
on the whole spread.

GPU timings drift within a run (clocks, temperature, other tenants), so timing variant A for a minute and then
variant B measures the drift as much as the difference. Every benchmark therefore:

1. warms every variant up first (compilation, autotuning, allocator caches);
2. times the variants interleaved, A B C, B C A, C A B, ... over several rounds (the order rotates, so no variant is
   always first after a pause), `reps` calls per variant per round, and keeps each round's median;
3. reports each variant's median over rounds with its spread (min-max of the round medians), and each ratio as the
   per-round ratios (A and B timed in the same round, seconds apart) with their median and min-max;
4. calls a target "met" only when the whole spread of the ratio clears it, "missed" when the whole spread fails it,
   and "inconclusive" when the spread straddles it.

    result = interleaved({"plain": step, "sqrt": step_sqrt}, rounds=7, reps=10, warmup=3)
    print(result.table())
    ratio = result.ratio("sqrt", "plain")        # time of sqrt over time of plain, per round
    ratio.verdict(at_most=1.35)                   # "met" | "missed" | "inconclusive"

Timing uses CUDA events when `device` is a CUDA device (and the function's work is queued on it), wall time
otherwise. `environment()` records the GPU, the versions and the date beside the figures.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# -----------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Spread:
    """A median with the min and max it came from (round medians, or per-round ratios)."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @staticmethod
    def of(values: list[float]) -> "Spread":
        if not values:
            raise ValueError("a spread needs at least one value")
        return Spread(statistics.median(values), min(values), max(values), tuple(values))

    def verdict(self, *, at_most: float | None = None, at_least: float | None = None) -> str:
        """'met' when the whole spread clears the target, 'missed' when none of it does, else 'inconclusive'."""
        if (at_most is None) == (at_least is None):
            raise ValueError("give exactly one of at_most and at_least")
        if at_most is not None:
            if self.high <= at_most:
                return "met"
            return "missed" if self.low > at_most else "inconclusive"
        if self.low >= at_least:
            return "met"
        return "missed" if self.high < at_least else "inconclusive"

    def __str__(self) -> str:
        return f"{self.median:.4g} [{self.low:.4g}-{self.high:.4g}]"

    def as_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "values": list(self.values)}


@dataclass
class Interleaved:
    """Round medians (ms) per variant, in the order the variants were given."""

    rounds_ms: dict[str, list[float]]
    reps: int
    order: list[list[str]] = field(default_factory=list)  # the variant order of each round, as run

    def time(self, variant: str) -> Spread:
        return Spread.of(self.rounds_ms[variant])

    def ratio(self, numerator: str, denominator: str) -> Spread:
        """Per-round ratio of the two variants' times (both timed in the same round)."""
        pairs = zip(self.rounds_ms[numerator], self.rounds_ms[denominator])
        return Spread.of([a / b for a, b in pairs])

    def table(self, *, baseline: str | None = None) -> str:
        """One line per variant: median ms [min-max], and its ratio to `baseline` (default: the first variant)."""
        baseline = baseline or next(iter(self.rounds_ms))
        width = max(len(name) for name in self.rounds_ms)
        lines = []
        for name in self.rounds_ms:
            ratio = "" if name == baseline else f"   {self.ratio(name, baseline)}x {baseline}"
            lines.append(f"{name:<{width}}  {self.time(name)} ms{ratio}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"reps_per_round": self.reps, "rounds": len(self.order), "order": self.order,
                "time_ms": {name: self.time(name).as_dict() for name in self.rounds_ms}}


# -----------------------------------------------------------------------------
# The method


def interleaved(variants: dict[str, Callable[[], object]], *, rounds: int = 7, reps: int = 10, warmup: int = 3,
                device: str | torch.device | None = None, sync: Callable[[], None] | None = None) -> Interleaved:
    """Time `variants` (name -> a no-argument callable) interleaved over `rounds`.

    Args:
        variants: at least one; each is called `warmup` times, then `reps` times in each round.
        rounds: >= 1 (5-9 gives a spread worth reading).
        reps: calls per variant per round; the round's figure is their median.
        warmup: untimed calls of each variant before the first round.
        device: a CUDA device times with CUDA events; None picks CUDA when available.
        sync: called after each call when timing on the CPU clock (e.g. a barrier across ranks).

    Returns:
        Interleaved, with each round's median per variant and the order the variants ran in.
    """
    if not variants:
        raise ValueError("interleaved needs at least one variant")
    if rounds < 1 or reps < 1 or warmup < 0:
        raise ValueError(f"rounds ({rounds}) and reps ({reps}) must be >= 1, warmup ({warmup}) >= 0")
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    _synchronize(device)
    result = Interleaved(rounds_ms={name: [] for name in names}, reps=reps)
    for round_index in range(rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]  # rotate: every variant takes every position in turn
        result.order.append(order)
        for name in order:
            result.rounds_ms[name].append(statistics.median(_time_calls(variants[name], reps, device, sync)))
    return result


def _time_calls(fn: Callable[[], object], reps: int, device: torch.device, sync) -> list[float]:
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# What the figures were measured on


def environment() -> dict:
    """GPU name (or CPU), versions and date, to store beside every result."""
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info
