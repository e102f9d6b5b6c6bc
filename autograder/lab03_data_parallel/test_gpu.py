"""Lab 03 on two GPUs over NCCL: bf16 tensors, CUDA streams, and torch DDP as the peer.

Every world-size-2 test of this lab also runs on NCCL where there are two GPUs (common.launch picks the backend);
these tests add what only a GPU can check. They are reported "not graded here" without two GPUs.

The ring all-reduce is checked against the sum, computed here in float64, of the bf16 inputs both ranks were given.
The DDP gradients are checked against torch DDP's, run by the ranks on the same GPUs and batches: the peer is torch's
own code, and it needs the GPUs and the process group the ranks hold.
"""

import pytest

from common.testing import check_close, describe


@pytest.mark.gpus(2)
@pytest.mark.points(3)
@pytest.mark.time_limit(180)
def test_nccl_bf16_matches_torch_ddp(student, compare_tensors):
    """Under bf16 autocast on NCCL, naive and bucketed DDP give torch DDP's gradients, and the ring all-reduce of a
    bf16 tensor equals the sum of the two ranks' tensors."""
    from autograder.lab03_data_parallel.workers import nccl_input, nccl_peer_run

    results = student.run(nccl_peer_run, 3)
    expected = sum(nccl_input(seed=3, rank=r).double() for r in range(2))
    for rank, out in enumerate(results):
        check_close(out["ring bf16"], expected, name="ring_all_reduce (bf16, NCCL)",
                    inputs=describe(rank=rank, numel=expected.numel()), dtype="bfloat16")
        for name in ("naive", "bucketed"):
            compare_tensors(out[name], out["torch"], name=f"{name} DDP gradient against torch DDP (bf16 autocast)",
                            inputs=describe(rank=rank, model="small", batch="4x128 per GPU"), dtype="bfloat16")
