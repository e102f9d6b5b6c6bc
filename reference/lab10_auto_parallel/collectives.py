"""The alpha-beta cost of collectives, ring algorithms, and hierarchical versions for groups that span nodes.

What it answers: how long one collective takes on a group of p devices, before running it. A message step costs a
latency alpha and each byte 1 / bandwidth (Hockney 1994); ring algorithms (Thakur, Rabenseifner & Gropp 2005,
"Optimization of Collective Communication Operations in MPICH") move, per device, for a full-size tensor of n bytes:

    all-reduce        2 (p-1) alpha + 2 (p-1)/p n / bw      (a reduce-scatter, then an all-gather)
    reduce-scatter      (p-1) alpha +   (p-1)/p n / bw      (n: the input; each device ends with n/p)
    all-gather          (p-1) alpha +   (p-1)/p n / bw      (n: the output)
    all-to-all          (p-1) alpha +   (p-1)/p n / bw      (n: what one device sends to all, itself included)
    point-to-point            alpha +           n / bw

A group laid out with `stride` between its members (common.mesh: tp varies fastest, then pp, then dp) has g members
on each of k nodes. Within a node the link is NVLink (`cluster.intra`), between nodes InfiniBand (`cluster.inter`);
a group on several nodes runs the two-level algorithm NCCL and Megatron-LM rely on:

    all-reduce      = reduce-scatter(n, g, intra) + all-reduce(n/g, k, inter) + all-gather(n, g, intra)
    reduce-scatter  = reduce-scatter(n, g, intra) + reduce-scatter(n/g, k, inter)
    all-gather      = all-gather(n/g, k, inter) + all-gather(n, g, intra)
    all-to-all      = all-to-all(n, k, inter) + all-to-all(n/k, g, intra)

Usage:
    collective_time("all_reduce", nbytes=2**30, group_size=16, cluster=load_profile("a100-80gb-selene"), stride=1)
"""

from __future__ import annotations

import math

from .profiles import ClusterProfile, Link

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")


def ring_time(kind: str, nbytes: float, group_size: int, link: Link) -> float:
    """Seconds for one ring collective of `kind` on a full-size tensor of `nbytes`, p = group_size devices, one link.

    A group of one device communicates nothing (0 s) except for "p2p", which always sends one message.

    Raises:
        ValueError: an unknown kind, nbytes < 0 or group_size < 1.
    """
    # BEGIN SOLUTION
    _check(kind, nbytes, group_size)
    p = group_size
    if kind == "p2p":
        return link.alpha + nbytes / link.bandwidth
    if p == 1:
        return 0.0
    steps, fraction = (2 * (p - 1), 2 * (p - 1) / p) if kind == "all_reduce" else (p - 1, (p - 1) / p)
    return steps * link.alpha + fraction * nbytes / link.bandwidth
    # END SOLUTION


def group_placement(group_size: int, stride: int, gpus_per_node: int) -> tuple[int, int]:
    """(members per node g, nodes k) of a group whose members are `stride` ranks apart, ranks filling nodes in order.

    Example: a data-parallel group of 4 with stride 8 (tp 8 inside each node) on 8-GPU nodes -> (1, 4); a tensor-
    parallel group of 4 with stride 1 -> (4, 1).
    """
    # BEGIN SOLUTION
    per_node = 1 if stride >= gpus_per_node else min(group_size, gpus_per_node // stride)
    return per_node, math.ceil(group_size / per_node)
    # END SOLUTION


def collective_time(kind: str, nbytes: float, *, group_size: int, cluster: ClusterProfile, stride: int = 1) -> float:
    """Seconds for a collective on a group of `group_size` devices `stride` ranks apart on `cluster`.

    For "p2p", group_size and stride describe the pipeline group whose neighbours talk: the message crosses nodes when
    that group spans several nodes (the slowest boundary sets the pace).

    Raises:
        ValueError: an unknown kind, nbytes < 0, group_size < 1 or stride < 1.
    """
    # BEGIN SOLUTION
    _check(kind, nbytes, group_size)
    if stride < 1:
        raise ValueError(f"collective_time: stride must be >= 1, got {stride}")
    g, k = group_placement(group_size, stride, cluster.gpus_per_node)
    if kind == "p2p":
        return ring_time("p2p", nbytes, 2, cluster.intra if k == 1 else cluster.inter)
    if k == 1:
        return ring_time(kind, nbytes, group_size, cluster.intra)
    if g == 1:
        return ring_time(kind, nbytes, group_size, cluster.inter)
    intra, inter = cluster.intra, cluster.inter
    if kind == "all_reduce":
        return (ring_time("reduce_scatter", nbytes, g, intra) + ring_time("all_reduce", nbytes / g, k, inter)
                + ring_time("all_gather", nbytes, g, intra))
    if kind == "reduce_scatter":
        return ring_time("reduce_scatter", nbytes, g, intra) + ring_time("reduce_scatter", nbytes / g, k, inter)
    if kind == "all_gather":
        return ring_time("all_gather", nbytes / g, k, inter) + ring_time("all_gather", nbytes, g, intra)
    return ring_time("all_to_all", nbytes, k, inter) + ring_time("all_to_all", nbytes / k, g, intra)
    # END SOLUTION


def _check(kind: str, nbytes: float, group_size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; choose one of {KINDS}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
