"""Lab 05, part 9: the same training through DeepSpeed's ZeRO stages 1-3 and FSDP2's fully_shard."""

import importlib.util

import pytest
import torch

from common.testing import check_close, describe

STEPS = 3


# -----------------------------------------------------------------------------
# Tests: run in the grader (the producer is in workers.py)


@pytest.mark.points(2)
@pytest.mark.time_limit(300)
def test_loss_trajectories_match_deepspeed_and_fsdp2(student):
    """On two ranks, in fp32: the submission's ZeRO-1/2/3, DeepSpeed ZeRO-1/2/3 (torch's AdamW, no op compiled) and
    FSDP2 (fully_shard on every block) give the loss trajectory of fp64 single-process training, and each stage's
    trajectory equals DeepSpeed's. (Where deepspeed is not installed, FSDP2 alone is the peer.)"""
    from autograder.lab05_zero.workers import expected_training, peers

    with_deepspeed = importlib.util.find_spec("deepspeed") is not None
    results = student.run(peers, 2, STEPS, 27, with_deepspeed)
    want = torch.tensor(expected_training(steps=STEPS, world_size=2, micro=1, seed=27)["losses"])
    for rank, got in enumerate(results):
        deepspeed = [f"DeepSpeed ZeRO-{s}" for s in (1, 2, 3)] if with_deepspeed else []
        if with_deepspeed:
            assert got["extensions built"] == [], f"DeepSpeed compiled ops {got['extensions built']} (rank {rank})"
        for name in [f"ours ZeRO-{s}" for s in (1, 2, 3)] + deepspeed + ["FSDP2 fully_shard"]:
            check_close(torch.tensor(got[name]), want, name=f"{name}: loss of each step",
                        inputs=describe(world_size=2, rank=rank, steps=STEPS), dtype="float32")
        for stage in (1, 2, 3) if with_deepspeed else ():
            check_close(torch.tensor(got[f"ours ZeRO-{stage}"]), torch.tensor(got[f"DeepSpeed ZeRO-{stage}"]),
                        name=f"ZeRO-{stage} against DeepSpeed ZeRO-{stage}: loss of each step",
                        inputs=describe(world_size=2, rank=rank), dtype="float32")
