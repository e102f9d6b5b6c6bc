"""KV-cache arithmetic: how many bytes a token costs, how many requests fit, and how much a cache layout wastes.

What it tells you: decoding is bound by memory, twice over. Every generated token re-reads the K/V of every earlier
token, and the batch that keeps a GPU busy is capped by how many sequences' K/V fit beside the weights.

Per token, every layer stores one key and one value vector per K/V head:

    bytes/token = 2 (K and V) * L (layers) * H_kv (K/V heads) * D (head dim) * bytes per element

    MHA (Vaswani et al. 2017):         H_kv = H
    MQA (Shazeer 2019, arXiv:1911.02150): H_kv = 1
    GQA (Ainslie et al. 2023, arXiv:2305.13245): H_kv = H / P, P query heads share a K/V head

The largest batch of sequences of N tokens beside the weights, with a fraction u of the GPU's memory usable:

    B_max = floor((u * memory - weights - activations) / (N * bytes/token))

Waste (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention",
arXiv:2309.06180, Section 3 and Figure 2): a contiguous cache reserves max_seq_len slots per request up front, so the
fraction of reserved slots holding no token is 1 - sum(n_i) / (R * max_seq_len) (the paper measured 60-80% in the
systems of the day). A paged cache allocates blocks of `block_size` slots on demand: only the last block of each
sequence is partly empty, 1 - sum(n_i) / sum(ceil(n_i / block_size) * block_size) (under 4%).

Usage:
    kv_bytes_per_token(num_layers=32, num_heads=32, head_dim=128, dtype=torch.bfloat16, attention="gqa",
                       num_kv_heads=8)                                  # 131072 bytes: 128 KiB per token
    max_batch_size(memory_bytes=141e9, weight_bytes=16e9, bytes_per_token=131072, seq_len=4096)
    contiguous_waste([300, 1200], max_seq_len=2048), paged_waste([300, 1200], block_size=16)
"""

from __future__ import annotations

import math

import torch

ATTENTION_KINDS = ("mha", "mqa", "gqa")

# -----------------------------------------------------------------------------
# Bytes per token


def kv_heads_of(attention: str, *, num_heads: int, num_kv_heads: int | None = None) -> int:
    """The number of K/V heads of an attention kind.

    Args:
        attention: "mha" (every query head has its K/V head), "mqa" (one K/V head) or "gqa" (num_kv_heads heads).
        num_heads: H, query heads (>= 1).
        num_kv_heads: H_kv for "gqa" (required there, must divide num_heads); ignored otherwise.

    Returns:
        H_kv.

    Raises:
        ValueError: an unknown kind, num_heads < 1, or a missing or non-dividing num_kv_heads for "gqa".
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: kv_heads_of is not implemented yet (lab08_serving/kv_arithmetic.py)")


def kv_bytes_per_token(*, num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype, attention: str = "mha",
                       num_kv_heads: int | None = None) -> int:
    """Bytes of KV cache one token takes across all layers: 2 * L * H_kv * D * element size.

    Args:
        num_layers: L (>= 1).
        num_heads: H, query heads.
        head_dim: D (>= 1).
        dtype: the cache's element type (bf16: 2 bytes, fp8: 1, fp32: 4).
        attention: "mha", "mqa" or "gqa" (see `kv_heads_of`).
        num_kv_heads: H_kv for "gqa".

    Returns:
        Bytes per token, an int.

    Raises:
        ValueError: num_layers or head_dim < 1, or what `kv_heads_of` rejects.
    """
    if num_layers < 1 or head_dim < 1:
        raise ValueError(f"num_layers ({num_layers}) and head_dim ({head_dim}) must be >= 1")
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: kv_bytes_per_token is not implemented yet (lab08_serving/kv_arithmetic.py)")


# -----------------------------------------------------------------------------
# How many sequences fit


def max_batch_size(*, memory_bytes: float, weight_bytes: float, bytes_per_token: int, seq_len: int,
                   activation_bytes: float = 0.0, utilization: float = 0.9) -> int:
    """The largest number of `seq_len`-token sequences whose KV cache fits beside the weights.

    Args:
        memory_bytes: the GPU's memory (an H200: 141e9).
        weight_bytes: the model's weights.
        bytes_per_token: from `kv_bytes_per_token`.
        seq_len: N, tokens per sequence (prompt + output), >= 1.
        activation_bytes: working memory of one forward pass, kept free as well.
        utilization: u in (0, 1], the fraction of memory the server may use.

    Returns:
        floor((u * memory - weights - activations) / (N * bytes/token)), never negative.

    Raises:
        ValueError: utilization outside (0, 1], seq_len or bytes_per_token < 1, or weights and activations that do not
            fit in u * memory.
    """
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if seq_len < 1 or bytes_per_token < 1:
        raise ValueError(f"seq_len ({seq_len}) and bytes_per_token ({bytes_per_token}) must be >= 1")
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: max_batch_size is not implemented yet (lab08_serving/kv_arithmetic.py)")


# -----------------------------------------------------------------------------
# Waste of a contiguous cache against a paged one


def contiguous_waste(token_counts: list[int], *, max_seq_len: int) -> float:
    """Fraction of reserved slots holding no token when every sequence reserves max_seq_len slots up front.

    Args:
        token_counts: n_i, tokens each sequence holds now (a snapshot; at completion: prompt + output), each in
            [1, max_seq_len].
        max_seq_len: the slots reserved per sequence.

    Returns:
        1 - sum(n_i) / (len(token_counts) * max_seq_len), in [0, 1).

    Raises:
        ValueError: no sequence, or a count outside [1, max_seq_len].
    """
    _check_counts(token_counts, upper=max_seq_len)
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: contiguous_waste is not implemented yet (lab08_serving/kv_arithmetic.py)")


def paged_waste(token_counts: list[int], *, block_size: int) -> float:
    """Fraction of allocated slots holding no token when sequences take blocks of block_size slots on demand.

    Args:
        token_counts: n_i, tokens each sequence holds now, each >= 1.
        block_size: slots per block (>= 1).

    Returns:
        1 - sum(n_i) / sum(ceil(n_i / block_size) * block_size), in [0, 1).

    Raises:
        ValueError: no sequence, a count < 1, or block_size < 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _check_counts(token_counts, upper=None)
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: paged_waste is not implemented yet (lab08_serving/kv_arithmetic.py)")


def _check_counts(token_counts: list[int], *, upper: int | None) -> None:
    if len(token_counts) == 0:
        raise ValueError("token_counts is empty: the waste of no sequence is undefined")
    for n in token_counts:
        if n < 1 or (upper is not None and n > upper):
            bound = f"[1, {upper}]" if upper is not None else ">= 1"
            raise ValueError(f"every token count must be {bound}, got {n}")
