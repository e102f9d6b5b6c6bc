"""Lab 03, part 3: bucketed DDP that overlaps communication with backward (ddp_bucketed.py)."""

import pytest
import torch

from common.testing import describe


def _expected_plan(nbytes: list[int], cap: int) -> list[list[int]]:
    """The rule from the docstring: reverse order; a parameter opens a new bucket when it would overflow the cap."""
    buckets, current, size = [], [], 0
    for index in reversed(range(len(nbytes))):
        if current and size + nbytes[index] > cap:
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes[index]
    return buckets + [current] if current else buckets


@pytest.mark.points(2)
def test_bucket_plan_for_given_caps():
    """plan_buckets packs parameters in reverse registration order up to the byte cap: the expected bucket counts."""
    from lab03_data_parallel.ddp_bucketed import plan_buckets

    params = [torch.empty(n) for n in (100, 200, 300, 400, 500)]  # 400 .. 2000 bytes
    expected = {2000: [[4], [3], [2, 1], [0]], 4000: [[4, 3], [2, 1, 0]], 1000: [[4], [3], [2], [1], [0]],
                10**9: [[4, 3, 2, 1, 0]], 2400: [[4], [3], [2, 1, 0]]}
    for cap, plan in expected.items():
        got = plan_buckets(params, cap_bytes=cap)
        assert got == plan, (f"plan_buckets(sizes 400..2000 bytes, cap_bytes={cap}) gave {len(got)} buckets {got}, "
                             f"expected {len(plan)}: {plan}")
    # a real model: the plan follows the rule for several caps
    from common.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.preset("tiny", num_layers=3))
    trainable = [p for p in model.parameters()]
    nbytes = [p.numel() * 4 for p in trainable]
    for cap in (4096, 20_000, 65_536, 200_000, 10**8):
        got = plan_buckets(trainable, cap_bytes=cap)
        plan = _expected_plan(nbytes, cap)
        assert got == plan, (f"plan_buckets on the tiny model ({describe(cap_bytes=cap)}): {len(got)} buckets, "
                             f"expected {len(plan)}")
    with pytest.raises(ValueError, match="cap"):
        plan_buckets(params, cap_bytes=0)


@pytest.mark.points(6)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_bucketed_ddp_matches_single_process(world_size, distributed, compare_tensors):
    """At caps of 1 KiB (one parameter a bucket), 40 KiB and 100 MiB (one bucket), 3 SGD steps of bucketed DDP equal
    single-process training on the concatenated batch, with tied, frozen and unused parameters."""
    from autograder.lab03_data_parallel.workers import ddp_train_worker

    variants = ["bucketed:0.001", "bucketed:0.04", "bucketed:100"]
    results = distributed(ddp_train_worker, world_size=world_size, args=(variants, 3, 13), timeout_s=100)
    for rank, out in enumerate(results):
        for variant in variants:
            inputs = describe(world_size=world_size, rank=rank, bucket_cap_mb=float(variant.split(":")[1]), steps=3)
            compare_tensors(out[f"{variant} initial"], out["reference initial"],
                            name="BucketedDDP: parameters after construction (rank 0's broadcast)", inputs=inputs)
            compare_tensors(out[f"{variant} grads"], out["reference grads"],
                            name="BucketedDDP: averaged gradients at step 3", inputs=inputs)
            compare_tensors(out[f"{variant} params"], out["reference params"],
                            name="BucketedDDP: parameters after 3 steps", inputs=inputs)
        trainable_bytes = [t.numel() * 4 for name, t in out["reference initial"].items()
                           if name != "blocks.0.attn_norm.weight"]
        for variant in variants:
            cap = int(float(variant.split(":")[1]) * 2**20)
            plan = _expected_plan(trainable_bytes, cap)
            got = out[f"{variant} buckets"]
            assert got == plan, (f"BucketedDDP.bucket_indices at bucket_cap_mb={variant.split(':')[1]}: {len(got)} "
                                 f"buckets {got}, expected {len(plan)} {plan} (trainable parameters only)")


@pytest.mark.points(4)
@pytest.mark.time_limit(90)
def test_communication_overlaps_backward(distributed):
    """The first bucket's all-reduce is launched while backward is still producing gradients: in the event log,
    and as seen by a wrapped dist.all_reduce and the test's own gradient hooks."""
    from autograder.lab03_data_parallel.workers import overlap_worker

    results = distributed(overlap_worker, world_size=2, args=(0.02,), timeout_s=60)
    for rank, out in enumerate(results):
        events = out["events"]
        kinds = [kind for kind, _ in events]
        where = f"rank {rank}, {out['num_buckets']} buckets, event log {events[:6]} ... {events[-4:]}"
        assert out["num_buckets"] >= 3, f"BucketedDDP at bucket_cap_mb=0.02 should make >= 3 buckets ({where})"
        assert kinds.count("launch") == out["num_buckets"] and kinds.count("wait") == out["num_buckets"], (
            f"the event log should hold one 'launch' and one 'wait' per bucket ({where})")
        assert kinds.count("grad_ready") == out["num_params"], (
            f"the event log should hold one 'grad_ready' per trainable parameter ({where})")
        first_launch = kinds.index("launch")
        last_ready = len(kinds) - 1 - kinds[::-1].index("grad_ready")
        assert first_launch < last_ready, (
            f"no overlap: the first bucket was launched (event {first_launch}) only after the last gradient was ready "
            f"(event {last_ready}) ({where})")
        assert events[last_ready][1] == out["last_param"], (
            f"the last 'grad_ready' should be {out['last_param']}, the last gradient backward produced ({where})")
        during = out["calls_during_backward"]
        assert during and during[0][0] < out["num_params"], (
            f"dist.all_reduce was called {len(during)} times during backward, the first with "
            f"{during[0][0] if during else '-'} of {out['num_params']} gradients ready: expected a call before "
            f"backward finished ({where})")


@pytest.mark.points(3)
@pytest.mark.time_limit(90)
def test_no_sync_accumulation_equals_large_batch(distributed, compare_tensors):
    """Three micro-batches per step, the first two inside no_sync() (which sends nothing), give the large-batch
    gradient, for two optimizer steps in a row."""
    from autograder.lab03_data_parallel.workers import no_sync_worker

    results = distributed(no_sync_worker, world_size=2, args=(3, 2, 17), timeout_s=60)
    for rank, out in enumerate(results):
        assert out["calls_inside_no_sync"] == [0, 0], (
            f"BucketedDDP.no_sync(): dist.all_reduce was called {out['calls_inside_no_sync']} times inside the "
            f"context (rank {rank}); gradients should stay local until the last micro-batch")
        for iteration in range(2):
            compare_tensors(out[f"grads {iteration}"], out[f"reference grads {iteration}"],
                            name=f"BucketedDDP with no_sync(): gradient of step {iteration + 1}",
                            inputs=describe(world_size=2, rank=rank, num_microbatches=3, local_batch=6))
