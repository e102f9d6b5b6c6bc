"""Lab 04 on GPUs over NCCL: tensor and pipeline parallelism with CUDA tensors, streams and events.

Every world-size-2 test of this lab also runs on NCCL where there are two GPUs (common.launch picks the backend); this
test adds fp32 CUDA runs and the CUDA-event timeline. It is reported "not graded here" without two GPUs.
"""

import pytest
import torch

from autograder.lab04_model_parallel.workers import assemble, gpu_checks
from common.testing import check_close, corpus_batch, describe, gradients, tiny_model


@pytest.mark.gpus(2)
@pytest.mark.points(3)
@pytest.mark.time_limit(180)
def test_nccl_tensor_and_pipeline_parallel(student):
    """Two GPUs, NCCL, fp32: the tp = 2 model and the 1F1B pipeline over 2 stages give the single-process loss and
    gradients (computed here on the CPU, compared at TF32 tolerance); the pipeline's timeline (CUDA events) is
    non-negative and increasing on each rank."""
    got = student.run(gpu_checks, 2, 91)
    model = tiny_model(seed=91, dtype=torch.float32)
    tokens, targets = corpus_batch(batch_size=4, seq_len=16, seed=91)
    loss = model.loss(tokens, targets)
    loss.backward()
    want = gradients(model)
    where = describe(tokens=tokens, world_size=2, backend="nccl")
    for rank, out in enumerate(got):
        check_close(out["tp"]["loss"], loss.detach(), name=f"TensorParallelTransformer.loss on GPU {rank}",
                    inputs=where, dtype="tf32")
    for name, full in want.items():
        check_close(assemble(name, [out["tp"]["grads"][name] for out in got], model.config, 2), full,
                    name=f"tp = 2 gradient of {name} (NCCL)", inputs=where, dtype="tf32")
        holder = [out["pp"]["grads"][name] for out in got if name in out["pp"]["grads"]]
        check_close(holder[0], full, name=f"1F1B pipeline gradient of {name} (NCCL)", inputs=where, dtype="tf32")
    check_close(got[1]["pp"]["loss"], loss.detach(), name="1F1B pipeline loss (NCCL)", inputs=where, dtype="tf32")
    for rank, out in enumerate(got):
        times = [t for _, _, start, end in out["pp"]["timeline"] for t in (start, end)]
        assert len(out["pp"]["timeline"]) == 8 and times == sorted(times) and times[0] >= 0, (
            f"the pipeline's CUDA-event timeline on GPU {rank} should hold 8 actions in increasing time: "
            f"{out['pp']['timeline']}")
