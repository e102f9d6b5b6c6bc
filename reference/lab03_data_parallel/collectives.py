"""Ring collectives from point-to-point messages: reduce-scatter, all-gather, and all-reduce as their composition.

What it saves: bandwidth. A naive all-reduce (everyone sends everything to rank 0, which sends the sum back) moves
2(p-1)·n bytes through rank 0's link. The ring moves 2(p-1)/p · n bytes through *every* link, which is at most 2n
whatever the world size p: the time becomes independent of p for large messages (Patarasuk & Yuan 2009,
"Bandwidth optimal all-reduce algorithms for clusters of workstations"; Baidu's ring all-reduce, 2017; the algorithm
NCCL runs for large messages, as analysed by Thakur, Rabenseifner & Gropp 2005).

Algorithm. Split the flat tensor into p chunks c_0..c_{p-1} (sizes differ by at most one: `chunk_bounds`). Rank r
sends to r+1 and receives from r-1 (mod p).

    reduce-scatter, step s = 0..p-2:   send c_{(r-s-1) mod p};  receive c_{(r-s-2) mod p} and add it to ours
                                       -> after p-1 steps rank r holds the full sum of chunk r
    all-gather,     step s = 0..p-2:   send c_{(r-s) mod p};    receive c_{(r-s-1) mod p} and overwrite ours
                                       -> after p-1 steps every rank holds every reduced chunk
    all-reduce     = reduce-scatter, then all-gather

The alpha-beta cost model (Hockney 1994; Thakur et al. 2005) charges alpha seconds of latency per message and beta
seconds per byte. Each ring step sends one chunk of n/p bytes, so

    T_reduce_scatter = T_all_gather = (p-1)·alpha + (p-1)/p · n·beta
    T_all_reduce                     = 2(p-1)·alpha + 2(p-1)/p · n·beta

Small messages are latency-bound (the 2(p-1)·alpha term), large ones bandwidth-bound. NCCL reports the *bus
bandwidth* busbw = (n / T) · 2(p-1)/p, which for a bandwidth-bound ring equals the link bandwidth 1/beta.

Usage (inside a process group; every rank calls the same functions in the same order):
    ring_all_reduce(grad, group=group)                       # in place, like dist.all_reduce
    shard = ring_reduce_scatter(x, group=group)              # (chunk_bounds(x.numel(), p)[r] sized,) sum
    full = ring_all_gather(shard, numel=x.numel(), group=group)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

OPS = ("sum", "avg")

# -----------------------------------------------------------------------------
# Cost model


@dataclass(frozen=True, kw_only=True)
class AlphaBeta:
    """The alpha-beta model of one link: alpha_s seconds per message, beta_s_per_byte seconds per byte (1 / bandwidth)."""

    alpha_s: float
    beta_s_per_byte: float

    def __post_init__(self) -> None:
        if self.alpha_s < 0 or self.beta_s_per_byte < 0:
            raise ValueError(f"alpha_s ({self.alpha_s}) and beta_s_per_byte ({self.beta_s_per_byte}) must be >= 0")

    def ring_time(self, collective: str, nbytes: int, world_size: int) -> float:
        """Predicted seconds for a ring `collective` ("all_reduce", "reduce_scatter", "all_gather") of nbytes.

        `nbytes` is the size of the whole (unsharded) tensor in every case.

        Raises:
            ValueError: an unknown collective, nbytes < 0 or world_size < 1.
        """
        if collective not in ("all_reduce", "reduce_scatter", "all_gather"):
            raise ValueError(f"collective must be all_reduce, reduce_scatter or all_gather, got {collective!r}")
        if nbytes < 0 or world_size < 1:
            raise ValueError(f"nbytes ({nbytes}) must be >= 0 and world_size ({world_size}) >= 1")
        # BEGIN SOLUTION
        p = world_size
        one_pass = (p - 1) * self.alpha_s + (p - 1) / p * nbytes * self.beta_s_per_byte
        return 2 * one_pass if collective == "all_reduce" else one_pass
        # END SOLUTION

    @staticmethod
    def fit(nbytes: list[int], seconds: list[float], *, world_size: int) -> "AlphaBeta":
        """Least-squares fit of measured ring all-reduce times to 2(p-1)·alpha + 2(p-1)/p·n·beta (clamped at >= 0)."""
        if len(nbytes) != len(seconds) or len(nbytes) < 2:
            raise ValueError(f"fit needs >= 2 (nbytes, seconds) pairs, got {len(nbytes)} and {len(seconds)}")
        p = world_size
        # T = a·x0 + b·x1 with x0 = 2(p-1), x1 = 2(p-1)/p·n: solve the 2x2 normal equations in float64
        design = torch.tensor([[2.0 * (p - 1), 2.0 * (p - 1) / p * n] for n in nbytes], dtype=torch.float64)
        # weight each point by 1/T so the small, latency-bound messages count as much as the large ones
        weights = 1.0 / torch.tensor(seconds, dtype=torch.float64)
        solution = torch.linalg.lstsq(design * weights[:, None], torch.ones_like(weights)[:, None]).solution
        return AlphaBeta(alpha_s=max(float(solution[0]), 0.0), beta_s_per_byte=max(float(solution[1]), 0.0))


def bus_bandwidth(nbytes: int, seconds: float, world_size: int) -> float:
    """NCCL's bus bandwidth of an all-reduce in bytes/s: (n / T) · 2(p-1)/p, comparable across world sizes."""
    return nbytes / seconds * 2 * (world_size - 1) / world_size


def chunk_bounds(numel: int, world_size: int) -> list[tuple[int, int]]:
    """The p chunks [start, stop) of a flat tensor of `numel` elements, sizes differing by at most one.

    The first numel % p chunks get one extra element (as `torch.tensor_split` does); when numel < p the last chunks
    are empty. Rank r owns chunk r after a reduce-scatter.
    """
    base, extra = divmod(numel, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        stop = start + base + (1 if rank < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


# -----------------------------------------------------------------------------
# Public entry points


def ring_reduce_scatter(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None, op: str = "sum") -> torch.Tensor:
    """This rank's chunk of the element-wise reduction over ranks of `tensor`.

    Args:
        tensor: any shape, the same shape and dtype on every rank; not modified.
        group: the process group (None: the default group).
        op: "sum" or "avg".

    Returns:
        A new flat tensor (stop - start,) with (start, stop) = chunk_bounds(tensor.numel(), p)[rank], same dtype.
    """
    rank, world_size = _rank_and_size(group)
    _check_op(op)
    flat = tensor.detach().reshape(-1).clone()  # the ring reduces in place, and the caller's tensor must survive
    bounds = chunk_bounds(flat.numel(), world_size)
    _reduce_scatter_inplace(flat, bounds, rank, world_size, group)
    start, stop = bounds[rank]
    shard = flat[start:stop].clone()
    return shard / world_size if op == "avg" else shard


def ring_all_gather(shard: torch.Tensor, *, numel: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's shard: the inverse layout of `ring_reduce_scatter`.

    Args:
        shard: (stop - start,) with (start, stop) = chunk_bounds(numel, p)[rank]; any dtype, the same on every rank.
        numel: the total number of elements, the same on every rank.
        group: the process group (None: the default group).

    Returns:
        A new flat tensor (numel,) holding rank r's shard at chunk r.

    Raises:
        ValueError: the shard does not have this rank's chunk size.
    """
    rank, world_size = _rank_and_size(group)
    bounds = chunk_bounds(numel, world_size)
    # BEGIN SOLUTION
    start, stop = bounds[rank]
    if shard.numel() != stop - start:
        raise ValueError(
            f"ring_all_gather: rank {rank}'s shard has {shard.numel()} elements, but chunk {rank} of numel {numel} "
            f"over {world_size} ranks has {stop - start} (see chunk_bounds)"
        )
    flat = torch.empty(numel, dtype=shard.dtype, device=shard.device)
    flat[start:stop] = shard.reshape(-1)
    _all_gather_inplace(flat, bounds, rank, world_size, group)
    return flat
    # END SOLUTION


def ring_all_reduce(tensor: torch.Tensor, *, group: dist.ProcessGroup | None = None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce, like `dist.all_reduce`: a ring reduce-scatter followed by a ring all-gather.

    Args:
        tensor: any shape and dtype, the same on every rank; overwritten with the reduction.
        group: the process group (None: the default group).
        op: "sum" or "avg".

    Returns:
        `tensor` itself.
    """
    rank, world_size = _rank_and_size(group)
    _check_op(op)
    # BEGIN SOLUTION
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()
    bounds = chunk_bounds(flat.numel(), world_size)
    _reduce_scatter_inplace(flat, bounds, rank, world_size, group)
    _all_gather_inplace(flat, bounds, rank, world_size, group)
    if op == "avg":
        flat.div_(world_size)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view_as(tensor))  # a non-contiguous input was reduced in a contiguous copy
    return tensor
    # END SOLUTION


# -----------------------------------------------------------------------------
# The two ring passes (in place on a flat buffer)


def _reduce_scatter_inplace(
    flat: torch.Tensor, bounds: list[tuple[int, int]], rank: int, world_size: int, group: dist.ProcessGroup | None
) -> None:
    """After p-1 steps, chunk `rank` of `flat` holds the sum over ranks; other chunks hold partial sums."""
    # BEGIN SOLUTION
    for step in range(world_size - 1):
        send_chunk = (rank - step - 1) % world_size
        recv_chunk = (rank - step - 2) % world_size
        start, stop = bounds[recv_chunk]
        incoming = torch.empty(stop - start, dtype=flat.dtype, device=flat.device)
        _exchange(flat[slice(*bounds[send_chunk])], incoming, rank, world_size, group)
        flat[start:stop] += incoming  # reduce into our copy of the chunk we will forward next step
    # END SOLUTION


def _all_gather_inplace(
    flat: torch.Tensor, bounds: list[tuple[int, int]], rank: int, world_size: int, group: dist.ProcessGroup | None
) -> None:
    """Given chunk `rank` final on each rank, after p-1 steps every chunk of `flat` is final everywhere."""
    # BEGIN SOLUTION
    for step in range(world_size - 1):
        send_chunk = (rank - step) % world_size
        recv_chunk = (rank - step - 1) % world_size
        # receive straight into our buffer: the chunk we overwrite is never the one we are sending
        _exchange(flat[slice(*bounds[send_chunk])], flat[slice(*bounds[recv_chunk])], rank, world_size, group)
    # END SOLUTION


def _exchange(
    send: torch.Tensor, recv: torch.Tensor, rank: int, world_size: int, group: dist.ProcessGroup | None
) -> None:
    """Send `send` to rank+1 and receive `recv` from rank-1 (group ranks), concurrently.

    Both directions are posted in one batch: with blocking send then recv, every rank would send first and, for
    messages larger than the transport's buffers, wait forever for a receiver. NCCL also needs the pair in one group
    call (`batch_isend_irecv`) or a send and a recv to the same peer serialise on one stream.
    Zero-sized chunks (numel < p) are skipped on both sides, which both compute from `chunk_bounds`.
    """
    # BEGIN SOLUTION
    next_rank = _global_rank(group, (rank + 1) % world_size)
    prev_rank = _global_rank(group, (rank - 1) % world_size)
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send.contiguous(), next_rank, group))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, prev_rank, group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    # END SOLUTION


# -----------------------------------------------------------------------------
# Small helpers


def _rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    # P2P calls address peers by their rank in the default group, even when `group` is a subgroup
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
