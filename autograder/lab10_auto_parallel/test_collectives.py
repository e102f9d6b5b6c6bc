"""Lab 10, part 1: the alpha-beta cost of collectives (collectives.py), flat rings and the two-level version for
groups that span nodes, against the formulas written out here."""

import math

import pytest

from autograder.lab10_auto_parallel.workers import call

LINK = {"alpha": 3e-5, "bandwidth": 7e9}
# a made-up cluster whose two links differ in every figure, so that a swapped link shows
CLUSTER = {"name": "a100-80gb-selene", "gpus_per_node": 4,
           "intra": {"alpha": 2e-6, "bandwidth": 2e11}, "inter": {"alpha": 9e-6, "bandwidth": 1.1e10}}


def _ring(kind, n, p, alpha, bw):
    if kind == "p2p":
        return alpha + n / bw
    if p == 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (p - 1) * alpha + 2 * (p - 1) * n / (p * bw)
    return (p - 1) * alpha + (p - 1) * n / (p * bw)


def _expected(kind, n, p, stride, gpus_per_node=4):
    intra, inter = (2e-6, 2e11), (9e-6, 1.1e10)
    per_node = 1 if stride >= gpus_per_node else min(p, gpus_per_node // stride)
    nodes = -(-p // per_node)
    if kind == "p2p":
        return _ring("p2p", n, 2, *(intra if nodes == 1 else inter))
    if nodes == 1:
        return _ring(kind, n, p, *intra)
    if per_node == 1:
        return _ring(kind, n, p, *inter)
    g, k = per_node, nodes
    if kind == "all_reduce":
        return _ring("reduce_scatter", n, g, *intra) + _ring("all_reduce", n / g, k, *inter) + \
            _ring("all_gather", n, g, *intra)
    if "reduce_scatter" == kind:
        return _ring("reduce_scatter", n, g, *intra) + _ring("reduce_scatter", n / g, k, *inter)
    if kind == "all_gather":
        return _ring("all_gather", n / g, k, *inter) + _ring("all_gather", n, g, *intra)
    return _ring("all_to_all", n, k, *inter) + _ring("all_to_all", n / k, g, *intra)


KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")


@pytest.mark.points(3)
def test_ring_time(student):
    """ring_time of every collective on 1, 2, 3 and 8 devices, for 0 bytes and an odd number of bytes."""
    keys = [(kind, n, p) for kind in KINDS for p in (1, 2, 3, 8) for n in (0, 1_000_003)]
    got = student.run(call, [{"module": "collectives", "fn": "ring_time",
                              "args": [("kind", k), ("nbytes", n), ("group_size", p), ("link", LINK)]}
                             for k, n, p in keys])
    for (kind, n, p), value in zip(keys, got):
        want = _ring(kind, n, p, LINK["alpha"], LINK["bandwidth"])
        assert isinstance(value, float | int) and math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-15), (
            f"ring_time({kind!r}, nbytes={n}, group_size={p}) = {value!r}, expected {want:.6g} s "
            f"(alpha {LINK['alpha']}, bandwidth {LINK['bandwidth']:.3g} B/s)")


@pytest.mark.points(2)
def test_group_placement(student):
    """group_placement: tp-like (stride 1), pp-like and dp-like groups on 8-device nodes, and odd sizes."""
    keys = [(4, 1, 8), (8, 1, 8), (16, 1, 8), (4, 2, 8), (4, 8, 8), (4, 16, 8), (6, 2, 8), (3, 4, 8), (12, 1, 8),
            (2, 3, 8), (1, 1, 8)]
    got = student.run(call, [{"module": "collectives", "fn": "group_placement", "args": [("a", s), ("b", st),
                                                                                       ("c", g)]}
                             for s, st, g in keys])
    for (size, stride, gpus), value in zip(keys, got):
        per_node = 1 if stride >= gpus else min(size, gpus // stride)
        want = [per_node, -(-size // per_node)]
        assert list(value) == want, (f"group_placement(group_size={size}, stride={stride}, gpus_per_node={gpus}) "
                                     f"= {value!r}, expected (members per node, nodes) = {tuple(want)}")


@pytest.mark.points(3)
def test_hierarchical(student):
    """collective_time on 4-device nodes with different links inside and between nodes: groups inside one node,
    one member per node, and the two-level algorithm (g members on each of k nodes), for every collective."""
    keys = [(kind, p, stride) for kind in KINDS for p, stride in ((4, 1), (2, 2), (8, 1), (4, 4), (2, 8), (8, 2),
                                                                 (16, 1), (1, 1))]
    n = 123_456_789
    got = student.run(call, [{"module": "collectives", "fn": "collective_time", "args": [("kind", k), ("n", n)],
                              "kwargs": {"group_size": p, "cluster": CLUSTER, "stride": s}} for k, p, s in keys])
    for (kind, p, stride), value in zip(keys, got):
        want = _expected(kind, n, p, stride)
        assert isinstance(value, float | int) and math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-15), (
            f"collective_time({kind!r}, {n} bytes, group_size={p}, stride={stride}) on 4-device nodes = {value!r}, "
            f"expected {want:.6g} s")


@pytest.mark.points(2)
def test_errors(student):
    """An unknown collective, negative bytes, an empty group and stride 0 raise ValueError naming the value."""
    cases = [("ring_time", ["broadcast", 10, 2]), ("ring_time", ["all_reduce", -1, 2]),
             ("ring_time", ["all_gather", 10, 0]), ("collective_time", ["scatter", 10]),
             ("collective_time", ["all_reduce", 10])]
    requests = []
    for fn, args in cases:
        names = ["kind", "nbytes", "group_size"][:len(args)]
        request = {"module": "collectives", "fn": fn, "args": list(zip(names, args))}
        if fn == "ring_time":
            request["args"].append(("link", LINK))
        else:
            request["kwargs"] = {"group_size": 2, "cluster": CLUSTER, "stride": 0 if args[0] == "all_reduce" else 1}
        requests.append(request)
    got = student.run(call, requests)
    for (fn, args), value, word in zip(cases, got, ("broadcast", "-1", "0", "scatter", "stride")):
        assert isinstance(value, str) and value.startswith("ValueError") and word in value, (
            f"{fn}{tuple(args)} should raise ValueError naming {word!r}, got {value!r}")
