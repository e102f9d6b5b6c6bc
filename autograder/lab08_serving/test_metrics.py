"""Lab 08, part 8: serving metrics (metrics.py): percentiles and the summary of a run, against values computed here
(torch.quantile interpolates linearly, as the lab's percentile must)."""

import pytest
import torch

# -----------------------------------------------------------------------------
# Producers: run in the worker


def percentile_of(values: list[float], q: float) -> float:
    from lab08_serving.metrics import percentile

    return percentile(values, q)


def summary_of(records: list[dict]) -> dict:
    from lab08_serving.metrics import RequestMetrics, summarize

    return summarize([RequestMetrics(**record) for record in records])


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _quantile(values: list[float], q: float) -> float:
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item()


@pytest.mark.points(2)
@pytest.mark.parametrize("values, q", [
    ([3.0], 50), ([2.0, 10.0], 25), ([5.0, 1.0, 4.0, 2.0, 3.0], 0), ([5.0, 1.0, 4.0, 2.0, 3.0], 100),
    ([0.9, 0.1, 0.4, 0.4, 0.7, 0.2], 37.5), ([7.0, 1.0, 3.0, 9.0], 90), ([1.5, 2.5, 0.5], 99), ([4.0, 8.0], 50),
])
def test_percentile_interpolates_linearly(student, values, q):
    """Unsorted inputs, one value, the extremes, duplicates, and ranks between two order statistics."""
    got = student.run(percentile_of, values, q)
    expected = _quantile(values, q)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), (
        f"percentile({values}, {q}) = {got}, expected {expected}")


RECORDS = [
    dict(arrival_time=0.0, first_token_time=0.5, finish_time=2.0, token_times=[[0.5, 0.75, 1.25, 2.0]]),
    dict(arrival_time=0.25, first_token_time=1.5, finish_time=3.5, token_times=[[1.5, 3.0], [1.75, 2.5, 3.5]]),
    dict(arrival_time=1.0, first_token_time=1.125, finish_time=1.125, token_times=[[1.125]]),
    dict(arrival_time=2.0, first_token_time=4.0, finish_time=5.0, token_times=[[4.0, 4.5, 5.0]]),
]


def _summary(records: list[dict]) -> dict:
    ttft = [r["first_token_time"] - r["arrival_time"] for r in records]
    latency = [r["finish_time"] - r["arrival_time"] for r in records]
    gaps = [t[i + 1] - t[i] for r in records for t in r["token_times"] for i in range(len(t) - 1)]
    tokens = sum(len(t) for r in records for t in r["token_times"])
    duration = max(r["finish_time"] for r in records) - min(r["arrival_time"] for r in records)
    expected = {"num_requests": len(records), "output_tokens": tokens, "duration_s": duration,
                "throughput_tok_s": tokens / duration}
    for q in (50, 90, 99):
        expected[f"ttft_p{q}_s"] = _quantile(ttft, q)
        expected[f"latency_p{q}_s"] = _quantile(latency, q)
        expected[f"itl_p{q}_s"] = _quantile(gaps, q) if gaps else 0.0
    return expected


@pytest.mark.points(3)
@pytest.mark.parametrize("records", [RECORDS, RECORDS[2:], [RECORDS[2]]])
def test_summary_of_a_run(student, records):
    """Throughput over the span from the first arrival to the last finish; TTFT, latency and inter-token gaps (within
    one output only, outputs of a request with n = 2 apart) as percentiles; no gap at all gives an ITL of 0."""
    got = student.run(summary_of, records)
    expected = _summary(records)
    assert set(got) == set(expected), f"summarize returned keys {sorted(got)}, expected {sorted(expected)}"
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (
            f"summarize(...)[{key!r}] = {got[key]}, expected {value}")
