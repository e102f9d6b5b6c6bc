"""Lab 05, part 8: sharded checkpoints saved at one world size and loaded at another (checkpoint.py)."""

import math

import pytest

from common.testing import check_all_close, check_close, describe

# -----------------------------------------------------------------------------
# Producers: run in the worker


def chunk_ranges(numel: int, world_size: int) -> list:
    from lab05_zero.checkpoint import chunk_range

    return [tuple(chunk_range(numel, world_size, rank)) for rank in range(world_size)]


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(1)
@pytest.mark.parametrize("numel, world_size", [(10, 4), (2, 4), (12, 4), (7, 1), (41, 3), (0, 2)])
def test_chunk_range_is_torch_chunk(student, numel, world_size):
    """chunk_range gives rank r's piece of torch.chunk: ceil(n/N) elements each, the last ones short or empty."""
    got = student.run(chunk_ranges, numel, world_size)
    size = math.ceil(numel / world_size) if numel else 0
    want = [(min(numel, r * size), min(numel, (r + 1) * size)) for r in range(world_size)]
    assert got == want, f"chunk_range({describe(numel=numel, world_size=world_size)}) over ranks: {got}, " \
                        f"expected {want}"


@pytest.mark.points(4)
@pytest.mark.time_limit(300)
def test_checkpoint_reshards_two_to_four_to_two(student):
    """Two steps of ZeRO-2 on 2 ranks, saved with torch.distributed.checkpoint; loaded by ZeRO-3 on 4 ranks (built
    from other initial weights), two more steps, saved; loaded by ZeRO-1 on 2 ranks, one more step: the master
    weights equal five steps of single-process training, the step count and the frozen weight come back, and every
    rank wrote its own file beside DCP's metadata."""
    from autograder.lab05_zero.workers import expected_training, make_model, reshard

    phases = [{"world_size": 2, "stage": 2, "first": 0, "steps": 2, "seed": 26},
              {"world_size": 4, "stage": 3, "first": 2, "steps": 2, "seed": 26},
              {"world_size": 2, "stage": 1, "first": 4, "steps": 1, "seed": 26}]
    results = student.run(reshard, phases, timeout_s=200)
    for index, (phase, ranks) in enumerate(zip(phases, results)):
        steps = phase["first"] + phase["steps"]
        want = expected_training(steps=steps, world_size=4, micro=1, seed=26)
        inputs = describe(**{k: v for k, v in phase.items() if k != "seed"})
        for rank, got in enumerate(ranks):
            where = f"{inputs}, rank={rank}"
            check_all_close(got["masters"], {k: want["params"][k] for k in got["masters"]},
                            name=f"master weights after steps 1-{steps} (phase {index + 1})", inputs=where)
            assert got["step_count"] == steps, f"optimizer step_count {got['step_count']}, expected {steps} ({where})"
            check_close(got["frozen"], make_model(seed=26).blocks[0].attn_norm.weight.detach(),
                        name=f"frozen weight (phase {index + 1}: rank 0's, then the checkpoint's)", inputs=where)
            if index < 2:
                files = got["files"]
                want_files = [".metadata"] + [f"__{r}_0.distcp" for r in range(phase["world_size"])]
                assert sorted(files) == sorted(want_files), (
                    f"the checkpoint folder holds {files}; torch.distributed.checkpoint writes {want_files} ({where})")
