"""Lab 10 hidden tests (inter-op DP): two nodes of two devices, submeshes (1, 1), (1, 2), (2, 2)."""

import math

import pytest

from autograder.lab10_auto_parallel.test_inter_op import _exhaustive, _objective, _tables
from autograder.lab10_auto_parallel.workers import call


@pytest.mark.points(2)
def test_two_nodes(student):
    """6 layers on 4 devices with a whole-cluster submesh, B 5, and a cap that binds."""
    submeshes = [[1, 1], [1, 2], [2, 2]]
    sizes = [1, 2, 4]
    cases = [(31, 6, 4, 5, math.inf), (32, 5, 4, 8, 6.0), (33, 6, 3, 2, math.inf)]
    tables = [_tables(seed, L, sizes) for seed, L, _, _, _ in cases]
    got = student.run(call, [{"module": "inter_op", "fn": "stage_dp", "args": [("a", lat), ("b", mem)],
                              "kwargs": {"submeshes": submeshes, "num_devices": N, "num_microbatches": B,
                                         "memory_cap": cap}} for (lat, mem), (_, _, N, B, cap) in zip(tables, cases)])
    for (seed, L, N, B, cap), (lat, mem), value in zip(cases, tables, got):
        want = _exhaustive(lat, mem, sizes, N, B, cap)
        achieved = _objective([tuple(s) for s in value["stages"]], lat, mem, sizes, N, B, cap, L)
        assert math.isclose(achieved, want, rel_tol=1e-9), f"case {seed}: T* {achieved} vs exhaustive {want}"
