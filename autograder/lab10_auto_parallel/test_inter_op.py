"""Lab 10, part 5: inter-operator parallelism, Alpa's stage-construction DP (inter_op.py), against exhaustive search
over every slicing of a few layers into stages and every assignment of submeshes, with a memory cap."""

import itertools
import math
import random

import pytest

from autograder.lab10_auto_parallel.workers import call

INF = math.inf
SUBMESHES = [[1, 1], [1, 2], [1, 4]]


def _tables(seed: int, L: int, sizes: list[int]):
    """Latency falls with more devices (sublinearly), memory per device falls with them too; random per stage."""
    rng = random.Random(seed)
    per_layer = [rng.uniform(1.0, 5.0) for _ in range(L)]
    mem_layer = [rng.uniform(1.0, 3.0) for _ in range(L)]
    latency = [[[0.0] * len(sizes) for _ in range(L + 1)] for _ in range(L)]
    memory = [[[0.0] * len(sizes) for _ in range(L + 1)] for _ in range(L)]
    for a in range(L):
        for b in range(a + 1, L + 1):
            for k, d in enumerate(sizes):
                work = sum(per_layer[a:b])
                latency[a][b][k] = round(work / d ** rng.uniform(0.6, 0.95) + 0.3 * (d > 1), 4)
                memory[a][b][k] = round(sum(mem_layer[a:b]) / d, 4)
    return latency, memory


def _exhaustive(latency, memory, sizes, N, B, cap):
    L = len(latency)
    best = INF
    for cuts in range(L):
        for points in itertools.combinations(range(1, L), cuts):
            bounds = list(zip((0,) + points, points + (L,)))
            for meshes in itertools.product(range(len(sizes)), repeat=len(bounds)):
                if sum(sizes[k] for k in meshes) != N:
                    continue
                S = len(bounds)
                if any(memory[a][b][k] * min(S - i, B) > cap for i, ((a, b), k) in enumerate(zip(bounds, meshes))):
                    continue
                times = [latency[a][b][k] for (a, b), k in zip(bounds, meshes)]
                best = min(best, sum(times) + (B - 1) * max(times))
    return best


def _objective(stages, latency, memory, sizes, N, B, cap, L):
    assert stages and stages[0][0] == 0 and stages[-1][1] == L, f"stages {stages} do not cover layers 0..{L}"
    for (a, b, _), (c, _, _) in zip(stages, stages[1:]):
        assert b == c, f"stages {stages} are not contiguous"
    assert sum(sizes[k] for _, _, k in stages) == N, f"stages {stages} do not use exactly {N} devices"
    S = len(stages)
    for i, (a, b, k) in enumerate(stages):
        assert memory[a][b][k] * min(S - i, B) <= cap, f"stage {(a, b, k)} of {stages} is over the memory cap"
    times = [latency[a][b][k] for a, b, k in stages]
    return sum(times) + (B - 1) * max(times)


CASES = [  # (seed, layers, devices, micro-batches, memory cap)
    (1, 4, 4, 8, INF), (2, 5, 4, 4, INF), (3, 3, 2, 1, INF), (4, 5, 4, 16, 9.0), (5, 4, 4, 6, 5.0),
    (6, 6, 8, 8, INF), (7, 5, 8, 3, 7.0), (8, 1, 4, 5, INF),
]


@pytest.mark.points(5)
def test_dp_matches_exhaustive(student):
    """stage_dp's T* equals the exhaustive minimum of sum t_i + (B-1) max t_i over slicings and submeshes (1x1, 1x2,
    1x4) that use all N devices, with 1F1B's in-flight micro-batches against the memory cap; the stages it returns
    are valid and achieve that T*."""
    sizes = [a * b for a, b in SUBMESHES]
    tables = [_tables(seed, L, sizes) for seed, L, _, _, _ in CASES]
    got = student.run(call, [{"module": "inter_op", "fn": "stage_dp", "args": [("a", lat), ("b", mem)],
                              "kwargs": {"submeshes": SUBMESHES, "num_devices": N, "num_microbatches": B,
                                         "memory_cap": cap}}
                             for (lat, mem), (_, _, N, B, cap) in zip(tables, CASES)])
    for (seed, L, N, B, cap), (latency, memory), value in zip(CASES, tables, got):
        want = _exhaustive(latency, memory, sizes, N, B, cap)
        assert isinstance(value, dict), f"stage_dp(case seed {seed}) returned {value!r}"
        achieved = _objective([tuple(s) for s in value["stages"]], latency, memory, sizes, N, B, cap, L)
        assert math.isclose(achieved, want, rel_tol=1e-9), (
            f"stage_dp on {L} layers, {N} devices, B {B}, cap {cap}: its stages {value['stages']} give T* "
            f"{achieved:.6g}, the exhaustive minimum is {want:.6g}")
        assert math.isclose(value["latency"], want, rel_tol=1e-9), (
            f"stage_dp reports T* {value['latency']:.6g}, its stages give {want:.6g}")


@pytest.mark.points(2)
def test_memory_and_errors(student):
    """A cap below every stage's memory raises ValueError naming the memory cap; B < 1 raises ValueError; a cap that
    only more, smaller stages meet forces them."""
    sizes = [a * b for a, b in SUBMESHES]
    latency, memory = _tables(11, 4, sizes)
    cases = [{"memory_cap": 0.01, "num_microbatches": 4}, {"memory_cap": INF, "num_microbatches": 0},
             {"memory_cap": 2.2, "num_microbatches": 4}]
    got = student.run(call, [{"module": "inter_op", "fn": "stage_dp", "args": [("a", latency), ("b", memory)],
                              "kwargs": {"submeshes": SUBMESHES, "num_devices": 4, **case}} for case in cases])
    assert isinstance(got[0], str) and got[0].startswith("ValueError") and "memory" in got[0], (
        f"stage_dp with a cap no stage meets should raise ValueError mentioning memory, got {got[0]!r}")
    assert isinstance(got[1], str) and got[1].startswith("ValueError"), (
        f"stage_dp with num_microbatches=0 should raise ValueError, got {got[1]!r}")
    want = _exhaustive(latency, memory, sizes, 4, 4, 2.2)
    assert isinstance(got[2], dict) and math.isclose(got[2]["latency"], want, rel_tol=1e-9), (
        f"stage_dp with cap 2.2: {got[2]!r}, expected T* {want:.6g}")


@pytest.mark.points(1)
def test_submesh_shapes(student):
    """submesh_shapes(N nodes, M devices): (1, 1), (1, 2), ..., (1, M/2), then (1, M), (2, M), ..., (N, M)."""
    got = student.run(call, [{"module": "inter_op", "fn": "submesh_shapes", "args": [("a", n), ("b", m)]}
                             for n, m in ((2, 8), (1, 1), (3, 4))])
    wants = [[[1, 1], [1, 2], [1, 4], [1, 8], [2, 8]], [[1, 1]], [[1, 1], [1, 2], [1, 4], [2, 4], [3, 4]]]
    for (n, m), value, want in zip(((2, 8), (1, 1), (3, 4)), got, wants):
        assert value == want, f"submesh_shapes({n}, {m}) = {value}, expected {want}"
