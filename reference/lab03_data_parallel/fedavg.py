"""Federated averaging: clients train locally for several steps, and the server averages their models by sample count.

What it saves: communication rounds. Synchronous DDP all-reduces gradients after every step; FedAvg lets each client
take `local_steps` SGD steps on its own data and communicates once per round, so K clients x E local steps cost one
exchange instead of E. The price is *client drift*: when the clients' data differ (non-IID), their local optima
differ, and the average of the local models is not the model large-batch SGD would reach (McMahan et al. 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", arXiv:1602.05629, Algorithm 1; the
simulation follows FedML's standalone mode, He et al. 2020, arXiv:2007.13518).

Algorithm 1 (FedAvg), round t, with client k holding n_k samples, n = Σ_{k in S_t} n_k:

    S_t     = a random subset of clients_per_round clients
    w_k     = ClientUpdate(k, w_t)            local_steps SGD steps from the global weights w_t
    w_{t+1} = Σ_{k in S_t} (n_k / n) · w_k    sample-weighted average

With local_steps = 1 and each client's whole data in one batch, Σ (n_k/n)(w - η g_k) = w - η Σ (n_k/n) g_k: exactly
one large-batch SGD step on the union of the clients' data. Uniform weights (1/K) break that identity whenever the
clients hold different amounts of data.

Non-IID splits. The corpus (`common.data`) is Python's help topics in sorted order, so *contiguous* shards cover
different topics (feature skew); shard sizes drawn from a log-normal give quantity skew. `split_non_iid` does both.

Usage:
    shards = split_non_iid(train_tokens, num_clients=8, seed=0)
    for round_index in range(10):
        fedavg_round(model, shards, config=FedAvgConfig(), round_index=round_index)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from common.data import get_batch

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class FedAvgConfig:
    """clients_per_round of num_clients train each round for local_steps SGD steps of batch_size windows of
    seq_len tokens at learning rate lr."""

    num_clients: int = 8
    clients_per_round: int = 4
    local_steps: int = 4
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_clients", "clients_per_round", "local_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"FedAvgConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) must be <= num_clients "
                             f"({self.num_clients})")
        if not self.lr > 0:
            raise ValueError(f"FedAvgConfig.lr must be > 0, got {self.lr}")


# -----------------------------------------------------------------------------
# Data: non-IID client shards


def split_non_iid(
    tokens: torch.Tensor, *, num_clients: int, seed: int, size_skew: float = 1.0, min_tokens: int = 256
) -> list[torch.Tensor]:
    """Cut the token stream into `num_clients` contiguous shards of log-normally skewed sizes.

    Args:
        tokens: (T,) int64, the corpus in its natural (topic-sorted) order.
        num_clients: K >= 1.
        seed: seeds a private generator (same seed, same split).
        size_skew: sigma of the log-normal shard-size weights; 0 gives equal sizes.
        min_tokens: every shard has at least this many tokens.

    Returns:
        K views of `tokens`, in order, whose concatenation is `tokens`.

    Raises:
        ValueError: K < 1, size_skew < 0, or T < K * min_tokens.
    """
    if num_clients < 1 or size_skew < 0:
        raise ValueError(f"num_clients ({num_clients}) must be >= 1 and size_skew ({size_skew}) >= 0")
    total = tokens.numel()
    if total < num_clients * min_tokens:
        raise ValueError(f"{total} tokens cannot give {num_clients} clients {min_tokens} tokens each")
    # BEGIN SOLUTION
    generator = torch.Generator().manual_seed(seed)
    weights = torch.exp(size_skew * torch.randn(num_clients, generator=generator, dtype=torch.float64))
    spare = total - num_clients * min_tokens  # what is left after every client's minimum
    sizes = [min_tokens + int(spare * w) for w in (weights / weights.sum()).tolist()]
    sizes[-1] += total - sum(sizes)  # rounding remainder: the split covers every token exactly once
    return list(tokens.split(sizes))
    # END SOLUTION


# -----------------------------------------------------------------------------
# Client and server


def client_update(
    global_model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *, lr: float
) -> tuple[dict[str, torch.Tensor], float]:
    """ClientUpdate: plain SGD on a copy of the global model, one step per batch.

    Args:
        global_model: w_t, with a `loss(tokens, targets)` method; not modified.
        batches: the local steps' batches, each (tokens (B, N), targets (B, N)) int64.
        lr: the SGD learning rate η.

    Returns:
        (w_k as a state dict of detached tensors, the mean training loss over the local steps).
    """
    # BEGIN SOLUTION
    local = copy.deepcopy(global_model)
    losses = []
    for tokens, targets in batches:
        loss = local.loss(tokens, targets)
        loss.backward()
        with torch.no_grad():
            for param in local.parameters():
                if param.grad is not None:
                    param -= lr * param.grad  # w <- w - η ∇ℓ(w; b)
                    param.grad = None
        losses.append(loss.item())
    state = {name: value.detach() for name, value in local.state_dict().items()}
    return state, sum(losses) / max(len(losses), 1)
    # END SOLUTION


def fedavg_aggregate(states: list[dict[str, torch.Tensor]], num_samples: list[float]) -> dict[str, torch.Tensor]:
    """The server step: Σ_k (n_k / n) · w_k for every floating-point entry (others are taken from client 0).

    Args:
        states: K >= 1 state dicts with the same keys and shapes.
        num_samples: n_k > 0 for each client.

    Returns:
        The averaged state dict, each entry in its original dtype (accumulated in float64).

    Raises:
        ValueError: no states, a length mismatch, a non-positive n_k, or differing keys.
    """
    # BEGIN SOLUTION
    if not states or len(states) != len(num_samples):
        raise ValueError(f"fedavg_aggregate: {len(states)} states but {len(num_samples)} sample counts")
    if any(not n > 0 for n in num_samples):
        raise ValueError(f"fedavg_aggregate: every num_samples must be > 0, got {num_samples}")
    if any(state.keys() != states[0].keys() for state in states):
        raise ValueError("fedavg_aggregate: the clients' state dicts have different keys")
    total = float(sum(num_samples))
    averaged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            averaged[key] = first.clone()
            continue
        accumulator = torch.zeros_like(first, dtype=torch.float64)
        for state, n in zip(states, num_samples):
            accumulator += (n / total) * state[key].double()
        averaged[key] = accumulator.to(first.dtype)
    return averaged
    # END SOLUTION


def fedavg_round(
    global_model: nn.Module, shards: list[torch.Tensor], *, config: FedAvgConfig, round_index: int
) -> float:
    """One round of Algorithm 1 on `global_model`, in place; returns the clients' mean local training loss.

    Clients are drawn without replacement from a generator seeded by (config.seed, round_index); client k's local
    batches are random windows of its shard, and its weight n_k is the number of windows its shard holds.
    """
    if len(shards) != config.num_clients:
        raise ValueError(f"{len(shards)} shards for FedAvgConfig.num_clients = {config.num_clients}")
    generator = torch.Generator().manual_seed(config.seed * 100_003 + round_index)
    chosen = torch.randperm(config.num_clients, generator=generator)[: config.clients_per_round].tolist()
    states, weights, losses = [], [], []
    for client in sorted(chosen):
        shard = shards[client]
        batches = [
            get_batch(shard, batch_size=config.batch_size, seq_len=config.seq_len,
                      seed=(config.seed * 1_000 + round_index) * 1_000 + client * 10 + step)
            for step in range(config.local_steps)
        ]
        state, loss = client_update(global_model, batches, lr=config.lr)
        states.append(state)
        weights.append(shard.numel() - config.seq_len)  # n_k: the windows of seq_len + 1 tokens the shard holds
        losses.append(loss)
    global_model.load_state_dict(fedavg_aggregate(states, weights), strict=False)
    return sum(losses) / len(losses)


def samples_per_round(config: FedAvgConfig) -> int:
    """Sequences processed per round (all clients): the x-axis when FedAvg is compared with synchronous DDP."""
    return config.clients_per_round * config.local_steps * config.batch_size

