"""Lab 10, part 4: intra-operator parallelism as Alpa's ILP (intra_op.py): the solver against brute force on small
random graphs (chains, a diamond, a cycle, forbidden pairs), its errors, the resharding costs, and the optimum of a
transformer layer's graph (Megatron-LM's column-then-row layer, or data parallelism)."""

import itertools
import math
import random

import pytest

from autograder.lab10_auto_parallel.formulas import TWO_LEVEL, group_time
from autograder.lab10_auto_parallel.workers import call, layer_choice

INF = math.inf


def _random_problem(seed: int, num_nodes: int, extra_edges: list[tuple[int, int]]):
    rng = random.Random(seed)
    sizes = [rng.randint(2, 4) for _ in range(num_nodes)]
    node_costs = [[round(rng.uniform(0.5, 9.0), 3) for _ in range(k)] for k in sizes]
    edges = []
    for u, v in [(i, i + 1) for i in range(num_nodes - 1)] + extra_edges:
        matrix = [[INF if rng.random() < 0.2 else round(rng.uniform(0.0, 6.0), 3) for _ in range(sizes[v])]
                  for _ in range(sizes[u])]
        edges.append((u, v, matrix))
    return node_costs, edges


def _objective(node_costs, edges, choice):
    total = sum(costs[i] for costs, i in zip(node_costs, choice))
    return total + sum(matrix[choice[u]][choice[v]] for u, v, matrix in edges)


def _brute_force(node_costs, edges):
    return min(_objective(node_costs, edges, choice)
               for choice in itertools.product(*(range(len(c)) for c in node_costs)))


@pytest.mark.points(4)
def test_ilp_matches_brute_force(student):
    """solve_intra_op's choice costs the brute-force minimum (and the cost it reports is that choice's) on chains,
    a diamond, a cycle, forbidden pairs and a single node."""
    problems = [_random_problem(seed, n, extra) for seed, n, extra in (
        (1, 5, []), (2, 6, [(0, 3)]), (3, 5, [(4, 0)]), (4, 4, [(0, 2), (1, 3)]), (5, 6, [(5, 1), (2, 5)]),
        (6, 3, []), (7, 7, [(0, 6)]))]
    problems.append(([[3.5, 1.25, 2.0]], []))
    got = student.run(call, [{"module": "intra_op", "fn": "solve_intra_op",
                              "args": [("node_costs", costs), ("edges", edges)]} for costs, edges in problems])
    for index, ((costs, edges), value) in enumerate(zip(problems, got)):
        best = _brute_force(costs, edges)
        assert isinstance(value, list) and len(value) == 2, f"problem {index}: solve_intra_op returned {value!r}"
        choice, cost = value
        assert len(choice) == len(costs) and all(0 <= c < len(k) for c, k in zip(choice, costs)), (
            f"problem {index}: choice {choice} is not one strategy index per node ({[len(k) for k in costs]})")
        actual = _objective(costs, edges, choice)
        assert math.isclose(actual, best, rel_tol=1e-9, abs_tol=1e-9), (
            f"problem {index} ({len(costs)} nodes, {len(edges)} edges): the choice {choice} costs {actual}, the "
            f"brute-force minimum is {best}")
        assert math.isclose(cost, actual, rel_tol=1e-9, abs_tol=1e-9), (
            f"problem {index}: reported cost {cost} but the choice {choice} costs {actual}")


@pytest.mark.points(2)
def test_ilp_errors(student):
    """No feasible choice (every pair forbidden), a node without strategies, an edge to a missing node and a matrix
    of the wrong shape raise ValueError."""
    cases = [([[1.0, 2.0], [1.0]], [(0, 1, [[INF], [INF]])]),
             ([[1.0], []], []),
             ([[1.0], [2.0]], [(0, 2, [[0.0]])]),
             ([[1.0, 2.0], [2.0]], [(0, 1, [[0.0, 1.0], [0.0, 1.0]])])]
    got = student.run(call, [{"module": "intra_op", "fn": "solve_intra_op", "args": [("a", c), ("b", e)]}
                             for c, e in cases])
    for index, value in enumerate(got):
        assert isinstance(value, str) and value.startswith("ValueError"), (
            f"solve_intra_op on bad problem {index} ({cases[index]}) should raise ValueError, got {value!r}")


@pytest.mark.points(2)
def test_reshard_time(student):
    """reshard_time for every pair of layouts on a tp 4 group (inside a node) and tp 8 (two nodes): forward and
    backward collectives (module docstring), nothing for tp 1, and P refused as a destination (inf)."""
    layouts = ("R", "S0", "S1", "P")
    n = 3_000_017
    keys = [(a, b, tp) for a in layouts for b in layouts for tp in (1, 4, 8)]
    got = student.run(call, [{"module": "intra_op", "fn": "reshard_time", "args": [("a", a), ("b", b), ("n", n)],
                              "kwargs": {"tp": tp, "cluster": TWO_LEVEL}} for a, b, tp in keys])
    for (a, b, tp), value in zip(keys, got):
        t = lambda kind: group_time(kind, n, tp, 1, TWO_LEVEL)  # noqa: E731
        if b == "P":
            want = INF
        elif a == b or tp == 1:
            want = 0.0
        elif a == "R":
            want = t("all_gather")
        elif b == "R":
            want = t("all_reduce") if a == "P" else t("all_gather")
        elif a == "P":
            want = t("reduce_scatter") + t("all_gather")
        else:
            want = 2 * (t("all_to_all") if tp <= 4 else _a2a(n, tp))
        assert value == want or math.isclose(value, want, rel_tol=1e-9), (
            f"reshard_time({a!r} -> {b!r}, {n} bytes, tp {tp}) = {value!r}, expected {want!r}")


def _a2a(n, p):
    from autograder.lab10_auto_parallel.formulas import ring

    intra = (TWO_LEVEL["intra"]["alpha"], TWO_LEVEL["intra"]["bandwidth"])
    inter = (TWO_LEVEL["inter"]["alpha"], TWO_LEVEL["inter"]["bandwidth"])
    k, g = p // 4, 4
    return ring("all_to_all", n, k, *inter) + ring("all_to_all", n / k, g, *intra)


@pytest.mark.points(2)
def test_layer_optimum(student):
    """A wide layer (C 8192) at one sequence of 2048 on tp 4: Megatron-LM's layer (qkv and gate_up column-parallel,
    attention and SwiGLU split by heads/features, out_proj and down_proj row-parallel); a narrow layer at a large
    batch: data parallelism everywhere."""
    wide = {"num_layers": 1, "width": 8192, "num_heads": 64, "num_kv_heads": 64, "vocab_size": 512,
            "max_seq_len": 2048}
    narrow = {"num_layers": 1, "width": 256, "num_heads": 4, "num_kv_heads": 4, "vocab_size": 512,
              "max_seq_len": 1024}
    megatron = student.run(layer_choice, wide, 1, 2048, 4, TWO_LEVEL)
    assert megatron[2:9] == ["column", "S1", "row", "R", "column", "S1", "row"], (
        f"the wide layer's ILP optimum is {megatron}, expected Megatron-LM's: qkv column, attention S1, out_proj row, "
        "mlp_norm R, gate_up column, swiglu S1, down_proj row")
    data = student.run(layer_choice, narrow, 64, 1024, 4, TWO_LEVEL)
    assert data[2:9:2] == ["data"] * 4 and data[0] == "S0", (
        f"the narrow layer at batch 64's ILP optimum is {data}, expected data parallelism (S0 input, every matmul "
        "'data')")
