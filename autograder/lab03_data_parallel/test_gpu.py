"""Lab 03 on two GPUs over NCCL: bf16 tensors, CUDA streams, and torch DDP as the peer.

Every world-size-2 test of this lab also runs on NCCL where there are two GPUs (common.launch picks the backend);
these tests add what only a GPU can check. They are reported "not graded here" without two GPUs.
"""

import pytest

from common.testing import check_close, describe


@pytest.mark.gpus(2)
@pytest.mark.points(3)
@pytest.mark.time_limit(180)
def test_nccl_bf16_matches_torch_ddp(distributed, compare_tensors):
    """Under bf16 autocast on NCCL, naive and bucketed DDP give torch DDP's gradients, and the ring all-reduce of a
    bf16 tensor equals NCCL's."""
    from autograder.lab03_data_parallel.workers import nccl_peer_worker

    results = distributed(nccl_peer_worker, world_size=2, backend="nccl", args=(3,), timeout_s=150)
    for rank, out in enumerate(results):
        got, expected = out["ring bf16"]
        check_close(got, expected, name="ring_all_reduce (bf16, NCCL) against dist.all_reduce",
                    inputs=describe(rank=rank, numel=got.numel()), dtype="bfloat16")
        for name in ("naive", "bucketed"):
            compare_tensors(out[name], out["torch"], name=f"{name} DDP gradient against torch DDP (bf16 autocast)",
                            inputs=describe(rank=rank, model="small", batch="4x128 per GPU"), dtype="bfloat16")
