"""Lab 03, part 2: naive data parallelism (ddp_naive.py)."""

import pytest
import torch

from common.testing import describe


@pytest.mark.points(1)
def test_shard_batch():
    """Each rank gets its contiguous B/p rows, and a batch the world size does not divide is refused."""
    from lab03_data_parallel.ddp_naive import shard_batch

    tokens = torch.arange(6 * 5).reshape(6, 5)
    targets = tokens + 1
    for world_size in (1, 2, 3, 6):
        local = 6 // world_size
        for rank in range(world_size):
            got_tokens, got_targets = shard_batch(tokens, targets, rank=rank, world_size=world_size)
            assert torch.equal(got_tokens, tokens[rank * local:(rank + 1) * local]) and torch.equal(
                got_targets, targets[rank * local:(rank + 1) * local]), (
                f"shard_batch(rank={rank}, world_size={world_size}) on {describe(tokens=tokens)} returned rows "
                f"{got_tokens[:, 0].div(5).tolist()}, expected rows {list(range(rank * local, (rank + 1) * local))}")
    with pytest.raises(ValueError, match="divisible"):
        shard_batch(tokens, targets, rank=0, world_size=4)


@pytest.mark.points(5)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_naive_ddp_matches_single_process(world_size, distributed, compare_tensors):
    """From differently seeded replicas, 3 SGD steps of naive DDP equal single-process training on the concatenated
    batch (tied embedding, a frozen weight and an unused parameter included)."""
    from autograder.lab03_data_parallel.workers import ddp_train_worker

    results = distributed(ddp_train_worker, world_size=world_size, args=(["naive"], 3, 11), timeout_s=90)
    for rank, out in enumerate(results):
        inputs = describe(world_size=world_size, rank=rank, steps=3, local_batch=2, lr=0.5)
        compare_tensors(out["naive initial"], out["reference initial"],
                        name="NaiveDDP: parameters after construction (rank 0's broadcast)", inputs=inputs)
        compare_tensors(out["naive grads"], out["reference grads"], name="NaiveDDP: averaged gradients at step 3",
                        inputs=inputs)
        compare_tensors(out["naive params"], out["reference params"], name="NaiveDDP: parameters after 3 steps",
                        inputs=inputs)


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_mismatched_parameters_are_rejected(distributed):
    """When rank 1's model has other shapes, NaiveDDP raises ValueError on every rank (no rank hangs)."""
    from autograder.lab03_data_parallel.workers import mismatch_worker

    results = distributed(mismatch_worker, world_size=2, timeout_s=60)
    for rank, out in enumerate(results):
        for wrapper, message in out.items():
            assert message.startswith("ValueError") and "differ" in message, (
                f"{wrapper} with a narrower model on rank 1 should raise ValueError('parameters differ across ranks "
                f"...') on every rank; rank {rank} got: {message}")
