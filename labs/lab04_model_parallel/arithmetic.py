"""Arithmetic of model parallelism: what one rank holds and what it sends, for tensor and pipeline parallelism.

What it answers: before launching anything, how many parameters each rank holds (memory), how many bytes of
activations it keeps for backward, and how many bytes go through its collectives per training step.

Parameters of common.model.Transformer (V vocab, C width, F FFN width, H_kv D = K/V width, L blocks), on the rank at
tensor-parallel size t and pipeline stage s of p:

    per block      2C (norms) + (2C^2 + 2 C H_kv D) / t + 3 C F / t     K/V: 2 C D instead when H_kv < t (a head's copy)
    embedding      V C / t on the first stage; final norm C and lm_head V C / t on the last (none when tied, p = 1)

Activations kept for backward, per block and micro-batch of b sequences of length s, 16-bit (Korthikanti et al. 2022,
arXiv:2205.05198, Eqs. 1-4, for a GPT block with a heads of width h):

    no parallelism        s b h (34 + 5 a s / h)
    tensor parallel       s b h (10 + 24 / t + 5 a s / (h t))
    + sequence parallel   s b h (34 + 5 a s / h) / t

and a pipeline stage keeps that for each of its blocks and each micro-batch in flight (schedules.simulate):
m micro-batches on every stage under GPipe, min(p - s, m) on stage s under 1F1B.

Communication per training step (one forward and one backward, T = B N tokens, A = T C x dtype bytes), counted as
the bytes of the full-size tensors handed to each collective (an all-gather's output, a reduce-scatter's input):

    tensor parallel       all-reduce  A (4L + 2)              embedding, 2 per block each way, lm_head's f
    sequence parallel     all-gather  A (4L + 2),  reduce-scatter  A (4L + 2)
    both                  all-reduce  3 T x max(dtype bytes, 4)  (the vocab-parallel loss: max, sum, target)
                          + 2 H_kv D C x dtype bytes per block when K/V heads are copied (H_kv < t)
                          + (2L + 1) C x dtype bytes with sequence parallelism (the norms' weight gradients)
    pipeline              stage s sends A forward (unless last) and A backward (unless first), whatever m is

A ring moves 2(t-1)/t of an all-reduce's bytes per rank and (t-1)/t of an all-gather's or reduce-scatter's
(`ring_bytes`): the same traffic for tensor parallelism with or without sequence parallelism.

Usage:
    parameters_per_rank(config, tp=2, pp=2, stage=0)
    tp_communication_bytes(config, batch_size=8, seq_len=1024, tp=4, dtype_bytes=2)
"""

from __future__ import annotations

from common.model import ModelConfig

from .schedules import gpipe, one_f_one_b, simulate

# -----------------------------------------------------------------------------
# Memory


def parameters_per_rank(config: ModelConfig, *, tp: int = 1, pp: int = 1, stage: int = 0) -> int:
    """Parameter elements held by one rank of tensor-parallel size tp, at pipeline stage `stage` of pp.

    Blocks are split over the stages as pipeline.partition_blocks splits them (the larger stages first).

    Raises:
        ValueError: stage outside [0, pp), or tp not dividing what it splits (naming the numbers).
    """
    if not 0 <= stage < pp:
        raise ValueError(f"parameters_per_rank: stage ({stage}) must be in [0, pp ({pp}))")
    # TODO (lab04): your code here
    raise NotImplementedError("lab04: parameters_per_rank is not implemented yet (lab04_model_parallel/arithmetic.py)")


def layer_activation_bytes(config: ModelConfig, *, micro_batch_size: int, seq_len: int, tp: int = 1,
                           sequence_parallel: bool = False) -> float:
    """Korthikanti et al.'s activation bytes of one block for one micro-batch (16-bit activations; Eqs. 1-4)."""
    s, b, h, a = seq_len, micro_batch_size, config.width, config.num_heads
    # TODO (lab04): your code here
    raise NotImplementedError("lab04: layer_activation_bytes is not implemented yet (lab04_model_parallel/arithmetic.py)")


def activation_bytes_per_rank(config: ModelConfig, *, micro_batch_size: int, seq_len: int, num_microbatches: int,
                              tp: int = 1, pp: int = 1, stage: int = 0, schedule: str = "1f1b",
                              sequence_parallel: bool = False) -> float:
    """Activation bytes a rank keeps at its peak: its blocks x the micro-batches in flight on its stage."""
    from .pipeline import partition_blocks

    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"schedule must be 'gpipe' or '1f1b', got {schedule!r}")
    # TODO (lab04): your code here
    raise NotImplementedError("lab04: activation_bytes_per_rank is not implemented yet (lab04_model_parallel/arithmetic.py)")


# -----------------------------------------------------------------------------
# Communication


def tp_communication_bytes(config: ModelConfig, *, batch_size: int, seq_len: int, tp: int, dtype_bytes: int,
                           sequence_parallel: bool = False) -> dict[str, int]:
    """Bytes of the full-size tensors one rank hands to each kind of collective in one training step of a
    sharding.TensorParallelTransformer (forward, vocab-parallel loss, backward). Keys: "all_reduce",
    "all_gather", "reduce_scatter"."""
    # TODO (lab04): your code here
    raise NotImplementedError("lab04: tp_communication_bytes is not implemented yet (lab04_model_parallel/arithmetic.py)")


def pp_communication_bytes(config: ModelConfig, *, batch_size: int, seq_len: int, num_stages: int, stage: int,
                           dtype_bytes: int) -> dict[str, int]:
    """Bytes stage `stage` sends and receives point-to-point in one training step (all micro-batches together).
    Keys: "send", "recv"."""
    # TODO (lab04): your code here
    raise NotImplementedError("lab04: pp_communication_bytes is not implemented yet (lab04_model_parallel/arithmetic.py)")


def ring_bytes(kind: str, nbytes: int, group_size: int) -> float:
    """Bytes each rank sends when a ring runs this collective on a full-size tensor of `nbytes`."""
    if kind == "all_reduce":
        return 2 * (group_size - 1) / group_size * nbytes
    if kind in ("all_gather", "reduce_scatter"):
        return (group_size - 1) / group_size * nbytes
    raise ValueError(f"ring_bytes: unknown collective {kind!r}")
