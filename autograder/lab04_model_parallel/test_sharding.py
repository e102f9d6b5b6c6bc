"""Lab 04, part 3: sharding a full checkpoint, and the whole tensor-parallel model built from it (sharding.py).

The sharded model must compute what the unsharded one computes: the same loss, and gradients that concatenate back
into the single-process gradients, also when the ranks form a dp x tp mesh and each replica sees half of the batch.
"""

import pytest
import torch

from autograder.lab04_model_parallel.workers import (check_tp_model, shard_errors, sharded_checkpoint, split_kind,
                                                     tp_model, tp_slice)
from common.testing import describe, tiny_model

MODEL_CASES = [
    {"model": {"num_layers": 2}, "batch": 4, "seq": 10},  # tiny preset: GQA 4 / 2 heads
    {"model": {"num_layers": 1, "num_kv_heads": 1, "tie_embeddings": True}, "batch": 4, "seq": 9, "ignore": 3},
]


# -----------------------------------------------------------------------------
# Tests


@pytest.mark.points(4)
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_shard_checkpoint(student, tp_size):
    """Each rank's shard of a full checkpoint is exactly its slice: rows of embed, lm_head, q/gate/up; columns of
    out/down; K/V heads split, or the whole head copied when H_kv < t (MQA); norms copied. New tensors, the
    checkpoint untouched."""
    for case in ({"num_layers": 2}, {"num_layers": 1, "num_kv_heads": 1, "tie_embeddings": True}):
        model = tiny_model(seed=1, **case)
        every_rank = student.run(sharded_checkpoint, case, tp_size)
        for rank, got in enumerate(every_rank):
            where = describe(model=case, tp_rank=rank, tp_size=tp_size)
            assert set(got["shards"]) == set(model.state_dict()), (
                f"shard_checkpoint must keep every name of the checkpoint ({where}); missing "
                f"{sorted(set(model.state_dict()) - set(got['shards']))[:3]}, extra "
                f"{sorted(set(got['shards']) - set(model.state_dict()))[:3]}")
            for name, full in model.state_dict().items():
                expect = tp_slice(name, full, model.config, rank, tp_size)
                shard = got["shards"][name]
                assert shard.shape == expect.shape and torch.equal(shard, expect), (
                    f"shard_checkpoint: {name} on rank {rank} of {tp_size} should be "
                    f"{split_kind(name, model.config, tp_size)} slice {tuple(expect.shape)}, got "
                    f"{tuple(shard.shape)}{'' if shard.shape != expect.shape else ' with other values'} ({where})")
            assert not got["aliased"], f"shard_checkpoint must return new tensors, not views ({where})"
            assert got["untouched"], f"shard_checkpoint changed the full checkpoint ({where})"


@pytest.mark.points(2)
def test_shard_errors(student):
    """A vocabulary the group does not divide, and an unknown parameter, raise ValueError (naming the numbers or the
    name); a divisible parameter shards without error."""
    got = student.run(shard_errors, 4)
    assert got["blocks.0.attn.q_proj.weight"] == "no error", got["blocks.0.attn.q_proj.weight"]
    message = got["embed.weight"]
    assert message.startswith("ValueError") and "18" in message and "4" in message.replace("18", ""), (
        f"shard_parameter of an 18-row embedding over 4 ranks should raise ValueError naming 18 and 4: {message}")
    message = got["blocks.0.not_a_layer.weight"]
    assert message.startswith("ValueError") and "not_a_layer" in message, (
        f"shard_parameter of an unknown parameter should raise ValueError naming it: {message}")


@pytest.mark.points(6)
@pytest.mark.time_limit(200)
@pytest.mark.parametrize("mesh", ["dp1xtp2", "dp2xtp2"])
def test_tensor_parallel_model_matches_single_process(student, mesh):
    """apply_tensor_parallel: the sharded model's loss equals the unsharded model's, and its gradients gathered from
    the ranks equal the single-process gradients (GQA; MQA with tied embeddings and padded targets), at tp = 2 and at
    dp = 2 x tp = 2 (each replica half of the batch, gradients averaged over dp)."""
    dp, tp = (1, 2) if mesh == "dp1xtp2" else (2, 2)
    got = student.run(tp_model, dp * tp, dp, tp, MODEL_CASES, 21)
    check_tp_model(got, MODEL_CASES, dp=dp, tp=tp, seed=21, sequence_parallel=False)
