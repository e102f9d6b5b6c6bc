"""Measuring a server: throughput, time to first token, inter-token latency, and the KV cache's occupancy over time.

What users feel and what the operator pays for are different numbers, so a serving benchmark reports several:

    throughput  = output tokens of all requests / (last finish - first arrival)          tokens/s (the operator's)
    TTFT_r      = first token time - arrival time of request r                            (a user waits this long)
    ITL         = gaps between consecutive tokens of one output, pooled over outputs       (how smoothly text streams)
    latency_r   = finish time - arrival time

Latencies are reported as percentiles (p50, p90, p99): a mean hides the few requests that waited behind a long
prefill. Percentiles interpolate linearly between order statistics (numpy's default, "type 7" of Hyndman and Fan
1996): for sorted values x_0 <= ... <= x_{n-1} and q in [0, 100], with r = q / 100 * (n - 1),

    percentile(q) = x_floor(r) + (r - floor(r)) * (x_ceil(r) - x_floor(r))

Usage:
    summary = summarize(engine_metrics)          # a dict of floats
    workload = synthetic_workload(256, prompt_lens=(32, 512), output_lens=(32, 512), vocab_size=32000, seed=0)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)

# -----------------------------------------------------------------------------
# What the engine records


@dataclass
class RequestMetrics:
    """Times (seconds, one clock) of one request. token_times[i] holds the production times of output i's tokens."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class StepRecord:
    """The engine's state after one step: what ran, and how full the KV cache was."""

    time: float
    num_prefills: int
    num_decodes: int
    num_batched_tokens: int
    num_preempted: int
    num_copies: int  # copy-on-write block copies before the step
    num_running: int
    num_waiting: int
    used_blocks: int
    stored_tokens: int  # tokens whose K/V the running sequences hold (shared blocks count once per sequence)


# -----------------------------------------------------------------------------
# Summaries


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile of values, interpolating linearly between order statistics (numpy's default).

    Args:
        values: at least one number, in any order.
        q: in [0, 100].

    Returns:
        A float; q = 0 gives the minimum, q = 100 the maximum.

    Raises:
        ValueError: no values, or q outside [0, 100].
    """
    if len(values) == 0:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: percentile is not implemented yet (lab08_serving/metrics.py)")


def summarize(metrics: list[RequestMetrics]) -> dict[str, float]:
    """Throughput and latency percentiles of finished requests.

    Args:
        metrics: one RequestMetrics per request, every request finished, with at least one output token.

    Returns:
        {"num_requests", "output_tokens", "duration_s", "throughput_tok_s", "ttft_p50_s", "ttft_p90_s",
        "ttft_p99_s", "itl_p50_s", "itl_p90_s", "itl_p99_s", "latency_p50_s", "latency_p90_s", "latency_p99_s"}.
        Inter-token gaps exist only between two tokens of one output: with no such gap the ITL entries are 0.

    Raises:
        ValueError: no request, or one that has not finished.
    """
    if not metrics:
        raise ValueError("summarize needs at least one request")
    if any(m.finish_time is None or m.first_token_time is None for m in metrics):
        raise ValueError("every request must have finished (finish_time and first_token_time set)")
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: summarize is not implemented yet (lab08_serving/metrics.py)")


# -----------------------------------------------------------------------------
# A workload


def synthetic_workload(num_requests: int, *, prompt_lens: tuple[int, int], output_lens: tuple[int, int],
                       vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """Requests with uniformly drawn prompt and output lengths (inclusive ranges) and random prompt tokens.

    Returns:
        [(prompt token ids, max_tokens)] * num_requests, the same for the same arguments.
    """
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_lens))]
        requests.append((prompt, rng.randint(*output_lens)))
    return requests
