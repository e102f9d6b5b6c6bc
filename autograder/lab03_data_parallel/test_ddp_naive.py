"""Lab 03, part 2: naive data parallelism (ddp_naive.py).

The ranks train (workers.ddp_rank) and return their parameters and gradients; the single-process training they must
equal is computed here (workers.reference_training), from the same seeds and batches.
"""

import pytest
import torch

from common.testing import describe


def shard_rows(batch_size: int, world_size: int) -> dict:
    """Producer: every rank's shard of a (batch_size, 5) batch whose row i holds 5i..5i+4, or the error."""
    from lab03_data_parallel.ddp_naive import shard_batch

    tokens = torch.arange(batch_size * 5).reshape(batch_size, 5)
    out = {}
    for rank in range(world_size):
        try:
            got_tokens, got_targets = shard_batch(tokens, tokens + 1, rank=rank, world_size=world_size)
            out[rank] = (got_tokens, got_targets)
        except Exception as error:  # noqa: BLE001
            out[rank] = f"{type(error).__name__}: {error}"
    return out


def shard_errors() -> dict:
    """Producer: shard_batch on mismatched shapes, non-(B, N) tensors and ranks out of range."""
    from lab03_data_parallel.ddp_naive import shard_batch

    tokens = torch.arange(24).reshape(6, 4)
    cases = {"targets of another shape": (tokens, tokens[:, :3], 0, 2), "flat tensors": (tokens.flatten(),
             tokens.flatten(), 0, 2), "rank = world_size": (tokens, tokens, 2, 2), "negative rank": (tokens, tokens,
             -1, 2)}
    out = {}
    for label, (a, b, rank, world_size) in cases.items():
        try:
            shard_batch(a, b, rank=rank, world_size=world_size)
            out[label] = "no error"
        except Exception as error:  # noqa: BLE001
            out[label] = f"{type(error).__name__}: {error}"
    return out


@pytest.mark.points(1)
@pytest.mark.parametrize("batch_size, world_size", [(6, 1), (6, 2), (6, 3), (6, 6), (12, 4)])
def test_shard_batch(student, batch_size, world_size):
    """Each rank gets its contiguous B/p rows of tokens and targets."""
    got = student.run(shard_rows, batch_size, world_size)
    tokens = torch.arange(batch_size * 5).reshape(batch_size, 5)
    rows_per_rank = batch_size // world_size
    for rank in range(world_size):
        want = tokens[rank * rows_per_rank:(rank + 1) * rows_per_rank]
        assert isinstance(got[rank], tuple), f"shard_batch(rank={rank}, world_size={world_size}) raised {got[rank]}"
        got_tokens, got_targets = got[rank]
        assert torch.equal(got_tokens, want) and torch.equal(got_targets, want + 1), (
            f"shard_batch(rank={rank}, world_size={world_size}) on {describe(tokens=tokens)} returned rows "
            f"{got_tokens[:, 0].div(5).tolist()}, expected rows {list(range(rank * rows_per_rank, (rank + 1) * rows_per_rank))}")


@pytest.mark.points(1)
def test_shard_batch_errors(student):
    """A batch the world size does not divide, mismatched or non-(B, N) tensors and a rank out of range raise
    ValueError."""
    got = student.run(shard_rows, 6, 4)
    assert all(isinstance(v, str) and v.startswith("ValueError") and "divisible" in v for v in got.values()), (
        f"shard_batch of 6 rows over 4 ranks should raise ValueError ('... divisible ...') on every rank, got {got}")
    for label, message in student.run(shard_errors).items():
        assert message.startswith("ValueError"), f"shard_batch with {label} should raise ValueError, got: {message}"


# -----------------------------------------------------------------------------
# Training on ranks, against single-process training computed here


def tolerance_dtype(world_size: int) -> str:
    """fp32 results: on NCCL (a GPU per rank) the ranks' kernels differ from this CPU's, so allow tf32's tolerance."""
    return "tf32" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "float32"


def check_training(results: list[dict], *, variant: str, label: str, world_size: int, steps: int, seed: int,
                   subgroups: bool = False, partly_unused: bool = False, compare=None) -> None:
    """Each rank's initial parameters (the broadcast), last gradients and final parameters against the reference
    training of its group."""
    from autograder.lab03_data_parallel.workers import ddp_group_layout, reference_training

    references = {}
    for rank, out in enumerate(results):
        members, stream = ddp_group_layout(world_size, rank, subgroups)
        if stream not in references:
            references[stream] = reference_training(seed=seed, steps=steps, group_size=len(members), stream=stream,
                                                    first_rank=members[0], partly_unused=partly_unused)
        want = references[stream]
        inputs = describe(world_size=world_size, rank=rank, group=members if subgroups else "default", steps=steps,
                          local_batch=2, lr=0.5, **({"unused_head used by": "group rank 0 only"} if partly_unused
                                                    else {}))
        dtype = tolerance_dtype(world_size)
        compare(out[f"{variant} initial"], want["initial"], inputs=inputs, dtype=dtype,
                name=f"{label}: parameters after construction (group rank 0's broadcast)")
        compare(out[f"{variant} grads"], want["grads"], inputs=inputs, dtype=dtype,
                name=f"{label}: averaged gradients at step {steps}")
        compare(out[f"{variant} params"], want["params"], inputs=inputs, dtype=dtype,
                name=f"{label}: parameters after {steps} steps")


@pytest.mark.points(5)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_naive_ddp_matches_single_process(student, world_size, compare_tensors):
    """From differently seeded replicas, 3 SGD steps of naive DDP equal single-process training on the concatenated
    batch (tied embedding, a frozen weight and an unused parameter included)."""
    from autograder.lab03_data_parallel.workers import ddp_training

    results = student.run(ddp_training, world_size, ["naive"], 3, 11)
    check_training(results, variant="naive", label="NaiveDDP", world_size=world_size, steps=3, seed=11,
                   compare=compare_tensors)


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_naive_ddp_parameter_used_on_some_ranks_only(shared_run, compare_tensors):
    """unused_head is used by rank 0's loss only: it has a gradient on rank 0 and none on the others, which count as
    zeros in the average, and no rank waits for another."""
    check_training(partly_unused_training(shared_run), variant="naive", label="NaiveDDP with a parameter used on rank 0 only", world_size=4,
                   steps=2, seed=29, partly_unused=True, compare=compare_tensors)


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_naive_ddp_on_subgroups(shared_run, compare_tensors):
    """World size 4, two data-parallel groups (even and odd ranks) training independent replicas on different data:
    the broadcast comes from each group's rank 0 (global rank 1 for the odd group) and gradients are averaged over
    the group's 2 ranks."""
    check_training(subgroup_training(shared_run), variant="naive", label="NaiveDDP(group=subgroup)", world_size=4,
                   steps=2, seed=31, subgroups=True, compare=compare_tensors)


def partly_unused_training(shared_run) -> list[dict]:
    """One run for naive and bucketed DDP with unused_head used on rank 0 only (each part checks its own)."""
    from autograder.lab03_data_parallel.workers import ddp_training

    return shared_run(ddp_training, 4, ["naive", "bucketed:0.01"], 2, 29, partly_unused=True)


def subgroup_training(shared_run) -> list[dict]:
    """One run for naive and bucketed DDP on subgroups (the bucketed half is checked by a hidden test)."""
    from autograder.lab03_data_parallel.workers import ddp_training

    return shared_run(ddp_training, 4, ["naive", "bucketed:0.04"], 2, 31, subgroups=True)


def mismatch_detail(how: str) -> list[str]:
    """What the error must name: the first parameter whose signature differs, or both parameter counts."""
    from autograder.lab03_data_parallel.workers import mismatched_model

    ours, theirs = (list(mismatched_model(how, rank).named_parameters()) for rank in (0, 1))
    if len(ours) != len(theirs):
        return [str(len(ours)), str(len(theirs))]
    return [next(a[0] for a, b in zip(ours, theirs) if (a[1].shape, a[1].requires_grad) != (b[1].shape,
                                                                                           b[1].requires_grad))]


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_mismatched_parameters_are_rejected(student):
    """When rank 1's replica differs (a weight frozen on rank 1 only, a narrower model, an extra parameter), NaiveDDP
    and BucketedDDP raise ValueError on every rank (no rank hangs in the broadcast), naming the first parameter that
    differs (or both parameter counts)."""
    from autograder.lab03_data_parallel.workers import mismatched_wrappers

    for rank, out in enumerate(student.run(mismatched_wrappers)):
        for case, message in out.items():
            wrapper, how = case.split()
            assert message.startswith("ValueError") and "differ" in message, (
                f"{wrapper} with a replica on rank 1 that differs in {how} should raise ValueError('parameters differ "
                f"across ranks ...') on every rank; rank {rank} got: {message}")
            for detail in mismatch_detail(how):
                assert detail in message, (f"{wrapper} with a replica on rank 1 that differs in {how}: the error should "
                                           f"name {detail!r}; rank {rank} got: {message}")
