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
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: ring_time is not implemented yet (lab10_auto_parallel/collectives.py)")


def group_placement(group_size: int, stride: int, gpus_per_node: int) -> tuple[int, int]:
    """(members per node g, nodes k) of a group whose members are `stride` ranks apart, ranks filling nodes in order.

    Example: a data-parallel group of 4 with stride 8 (tp 8 inside each node) on 8-GPU nodes -> (1, 4); a tensor-
    parallel group of 4 with stride 1 -> (4, 1).
    """
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: group_placement is not implemented yet (lab10_auto_parallel/collectives.py)")


def collective_time(kind: str, nbytes: float, *, group_size: int, cluster: ClusterProfile, stride: int = 1) -> float:
    """Seconds for a collective on a group of `group_size` devices `stride` ranks apart on `cluster`.

    For "p2p", group_size and stride describe the pipeline group whose neighbours talk: the message crosses nodes when
    that group spans several nodes (the slowest boundary sets the pace).

    Raises:
        ValueError: an unknown kind, nbytes < 0, group_size < 1 or stride < 1.
    """
    # TODO (lab10): your code here
    raise NotImplementedError("lab10: collective_time is not implemented yet (lab10_auto_parallel/collectives.py)")


def _check(kind: str, nbytes: float, group_size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; choose one of {KINDS}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
