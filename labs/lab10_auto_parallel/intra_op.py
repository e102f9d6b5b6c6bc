"""Intra-operator parallelism as an integer linear program (Alpa, Zheng et al. 2022, arXiv:2201.12023, Section 4).

What it decides: for every operator of a layer's graph, how it is sharded on a 1-D mesh of t devices, trading each
operator's compute and communication against the cost of resharding tensors between operators.

Alpa's formulation (its Eq. 1): operator v picks one strategy, a one-hot vector s_v; strategy i of v costs c_v[i]
(compute + the communication it does itself); an edge (u, v) whose producer's output layout differs from the layout
the consumer needs costs R_uv[i][j] (the resharding collective). Minimise

    sum_v s_v^T c_v + sum_(u,v) s_u^T R_uv s_v

The quadratic term is linearised with one binary e_uv[i][j] per pair (Alpa's trick): sum_j e_uv[i][j] = s_u[i] and
sum_i e_uv[i][j] = s_v[j], so e_uv is the outer product of the two one-hot choices. Infinite (impossible) pairs have
no variable. HiGHS solves the ILP (through PuLP).

The layer graph (common.model's block, the residual adds left out): input -> attn_norm -> qkv -> attention -> out_proj
-> mlp_norm -> gate_up -> swiglu -> down_proj -> output. Layouts of a (T, features) activation: R replicated, S0 split
along tokens, S1 split along features (heads), P partial sums. A matmul X (T, K) W (K, M) may run

    replicated  R -> R    3 x 2TKM flops on every device
    data        S0 -> S0  1/t of the flops, + all-reduce of the weight gradient (K M) in backward
    column      R -> S1   1/t of the flops, + all-reduce of the input gradient (T K) in backward  (Megatron's f)
    row         S1 -> P   1/t of the flops                                                        (then g)

and a resharding edge costs its forward collective and the one its gradient needs in backward:

    R -> S0/S1    a slice forward; all-gather of the gradient backward
    S0/S1 -> R    all-gather forward; a slice backward
    S0 <-> S1     all-to-all forward and backward
    P -> R        all-reduce forward (Megatron's g); nothing backward
    P -> S0/S1    reduce-scatter forward; all-gather backward

Blocks repeat, so the output's layout must be the input's (an edge output -> input that forbids the others).
Megatron-LM's layer (column, then row: 2 all-reduces forward and 2 in backward) is the optimum when the weights are
large against the activations; data parallelism (S0 everywhere, weight gradients all-reduced) when they are small.

Usage:
    problem = layer_problem(config, batch_size=8, seq_len=1024, tp=8, cluster=cluster, workload=workload)
    choice, cost = solve_intra_op(problem.node_costs, problem.edges)
    [problem.strategies[v][i].name for v, i in enumerate(choice)]
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass

from common.model import ModelConfig

from .collectives import collective_time
from .cost_model import Workload
from .profiles import ClusterProfile

INF = math.inf
LAYOUTS = ("R", "S0", "S1", "P")


@dataclass(frozen=True)
class Strategy:
    """One way to run an operator: the input layout it needs, the output layout it gives, its cost in seconds."""

    name: str
    in_layout: str
    out_layout: str
    cost: float


@dataclass(frozen=True)
class IntraOpProblem:
    """Operators (names, strategies, node_costs[v][i]) and edges (u, v, R[i][j]) of a layer's graph."""

    names: list[str]
    strategies: list[list[Strategy]]
    node_costs: list[list[float]]
    edges: list[tuple[int, int, list[list[float]]]]


# -----------------------------------------------------------------------------
# The solver


def solve_intra_op(node_costs: list[list[float]],
                   edges: list[tuple[int, int, list[list[float]]]]) -> tuple[list[int], float]:
    """The minimum-cost choice of one strategy per node, solved as Alpa's ILP with HiGHS.

    Args:
        node_costs: node_costs[v][i], the cost of strategy i of node v (finite).
        edges: (u, v, R) with R[i][j] the cost when u picks i and v picks j; math.inf forbids the pair.

    Returns:
        (choice, cost): choice[v] the index of v's strategy; cost the objective at that choice.

    Raises:
        ValueError: a node without strategies, an edge naming a missing node or a matrix of the wrong shape, or no
            feasible choice (every combination hits an infinite edge).
    """
    import pulp

    _check_problem(node_costs, edges)
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: solve_intra_op is not implemented yet (lab10_auto_parallel/intra_op.py)")


def choice_cost(node_costs: list[list[float]], edges: list[tuple[int, int, list[list[float]]]],
                choice: list[int]) -> float:
    """The objective at a given choice: node costs plus edge costs (math.inf when a forbidden pair is chosen)."""
    total = sum(costs[i] for costs, i in zip(node_costs, choice))
    return total + sum(matrix[choice[u]][choice[v]] for u, v, matrix in edges)


@contextlib.contextmanager
def quiet_stdout():
    """Send the process's file descriptor 1 to /dev/null inside the block (C libraries print there directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _check_problem(node_costs, edges) -> None:
    if any(len(costs) == 0 for costs in node_costs):
        raise ValueError("solve_intra_op: every node needs at least one strategy")
    for u, v, matrix in edges:
        if not (0 <= u < len(node_costs) and 0 <= v < len(node_costs)):
            raise ValueError(f"solve_intra_op: edge ({u}, {v}) names a node outside [0, {len(node_costs)})")
        if len(matrix) != len(node_costs[u]) or any(len(row) != len(node_costs[v]) for row in matrix):
            raise ValueError(f"solve_intra_op: the cost matrix of edge ({u}, {v}) must be "
                             f"{len(node_costs[u])} x {len(node_costs[v])}")


# -----------------------------------------------------------------------------
# The layer's graph


def reshard_time(src: str, dst: str, nbytes: float, *, tp: int, cluster: ClusterProfile) -> float:
    """Forward seconds to turn an activation of `nbytes` (full size) from layout src into dst on the tp group.

    Raises:
        ValueError: an unknown layout.
    """
    if src not in LAYOUTS or dst not in LAYOUTS:
        raise ValueError(f"layouts must be in {LAYOUTS}, got {src!r} -> {dst!r}")
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: reshard_time is not implemented yet (lab10_auto_parallel/intra_op.py)")


def matmul_strategies(tokens: int, k: int, m: int, *, tp: int, cluster: ClusterProfile,
                      workload: Workload) -> list[Strategy]:
    """The four strategies of X (tokens, k) @ W (k, m) (module docstring), forward and backward costed."""
    flops = 3 * 2 * tokens * k * m / cluster.achievable_flops
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: matmul_strategies is not implemented yet (lab10_auto_parallel/intra_op.py)")


def layer_problem(config: ModelConfig, *, batch_size: int, seq_len: int, tp: int, cluster: ClusterProfile,
                  workload: Workload) -> IntraOpProblem:
    """The ILP of one block of `config` on a 1-D mesh of tp devices, for batch_size sequences of seq_len tokens."""
    T, C, F = batch_size * seq_len, config.width, config.hidden_width
    qkv_width = C + 2 * config.num_kv_heads * config.head_dim
    attention = 3 * 4 * batch_size * seq_len * seq_len * C / cluster.achievable_flops
    elementwise = 0.0  # norms and the SwiGLU product: memory-bound, negligible beside the GEMMs here
    mm = lambda k, m: matmul_strategies(T, k, m, tp=tp, cluster=cluster, workload=workload)  # noqa: E731
    split = lambda cost, layouts: [Strategy(f"{a}", a, a, cost / (1 if a == "R" else tp)) for a in layouts]  # noqa
    nodes = [
        ("input", [Strategy("R", "R", "R", 0.0), Strategy("S0", "S0", "S0", 0.0)]),
        ("attn_norm", split(elementwise, ("R", "S0"))),
        ("qkv", mm(C, qkv_width)),
        ("attention", split(attention, ("R", "S0", "S1"))),
        ("out_proj", mm(C, C)),
        ("mlp_norm", split(elementwise, ("R", "S0"))),
        ("gate_up", mm(C, 2 * F)),
        ("swiglu", split(elementwise, ("R", "S0", "S1"))),
        ("down_proj", mm(F, C)),
        ("output", [Strategy("R", "R", "R", 0.0), Strategy("S0", "S0", "S0", 0.0)]),
    ]
    widths = [C, C, qkv_width, C, C, C, 2 * F, F, C]  # the feature width of the tensor on each edge
    names = [name for name, _ in nodes]
    strategies = [options for _, options in nodes]
    edges = []
    for u, width in enumerate(widths):
        nbytes = T * width * workload.activation_bytes
        matrix = [[reshard_time(a.out_layout, b.in_layout, nbytes, tp=tp, cluster=cluster) for b in strategies[u + 1]]
                  for a in strategies[u]]
        edges.append((u, u + 1, matrix))
    last = len(nodes) - 1
    edges.append((last, 0, [[0.0 if a.name == b.name else INF for b in strategies[0]] for a in strategies[last]]))
    return IntraOpProblem(names=names, strategies=strategies,
                          node_costs=[[option.cost for option in options] for options in strategies], edges=edges)
