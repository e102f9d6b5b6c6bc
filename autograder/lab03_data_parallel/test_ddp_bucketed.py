"""Lab 03, part 3: bucketed DDP that overlaps communication with backward (ddp_bucketed.py).

Training runs on the ranks (workers.py); the single-process training it must equal, the bucket plans and the launch
schedule the event log must follow are computed here.
"""

import pytest
import torch

from common.testing import describe


def expected_plan(nbytes: list[int], cap: int, kinds: list | None = None) -> list[list[int]]:
    """The rule from the docstring: reverse order; a parameter opens a new bucket when it would overflow the cap, or
    when its dtype differs from the bucket's."""
    kinds = kinds or [None] * len(nbytes)
    buckets, current, size = [], [], 0
    for index in range(len(nbytes) - 1, -1, -1):
        if current and (size + nbytes[index] > cap or kinds[index] != kinds[current[0]]):
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes[index]
    return buckets + [current] if current else buckets


def plans(cases: dict) -> dict:
    """Producer: plan_buckets for each case (name -> (numels, dtype names, cap_bytes)), or the error it raised."""
    from lab03_data_parallel.ddp_bucketed import plan_buckets

    out = {}
    for name, (numels, dtypes, cap) in cases.items():
        params = [torch.empty(n, dtype=getattr(torch, d)) for n, d in zip(numels, dtypes)]
        try:
            out[name] = plan_buckets(params, cap_bytes=cap)
        except Exception as error:  # noqa: BLE001
            out[name] = f"{type(error).__name__}: {error}"
    return out


def config_errors() -> dict:
    """Producer: BucketConfig with a cap that is not > 0."""
    from lab03_data_parallel.ddp_bucketed import BucketConfig

    out = {}
    for cap in (0.0, -1.0):
        try:
            BucketConfig(bucket_cap_mb=cap)
            out[cap] = "no error"
        except Exception as error:  # noqa: BLE001
            out[cap] = f"{type(error).__name__}: {error}"
    return out


@pytest.mark.points(2)
def test_bucket_plan_for_given_caps(student):
    """plan_buckets packs parameters in reverse registration order up to the byte cap: given plans for 400..2000-byte
    parameters, the rule on the tiny model at several caps, a parameter larger than the cap alone, and cap 0 refused."""
    from common.model import ModelConfig, Transformer

    sizes = [100, 200, 300, 400, 500]  # fp32: 400 .. 2000 bytes
    given = {2000: [[4], [3], [2, 1], [0]], 4000: [[4, 3], [2, 1, 0]], 1000: [[4], [3], [2], [1], [0]],
             10**9: [[4, 3, 2, 1, 0]], 2400: [[4], [3], [2, 1, 0]], 1999: [[4], [3], [2], [1, 0]],
             1200: [[4], [3], [2], [1, 0]], 100: [[4], [3], [2], [1], [0]]}
    model_numels = [w.numel() for w in Transformer(ModelConfig.preset("tiny", num_layers=3)).parameters()]
    model_caps = (4096, 20_000, 65_536, 200_000, 10**8)
    cases = {f"cap {cap}": (sizes, ["float32"] * 5, cap) for cap in given}
    cases.update({f"tiny model cap {cap}": (model_numels, ["float32"] * len(model_numels), cap) for cap in model_caps})
    cases["cap 0"] = (sizes, ["float32"] * 5, 0)
    cases["dtypes"] = ([10, 10, 10, 10, 10], ["float64", "float32", "float32", "float64", "float64"], 10**6)
    got = student.run(plans, cases)
    for cap, plan in given.items():
        assert got[f"cap {cap}"] == plan, (
            f"plan_buckets(sizes 400..2000 bytes, cap_bytes={cap}) gave {got[f'cap {cap}']}, expected {plan}")
    for cap in model_caps:
        plan = expected_plan([n * 4 for n in model_numels], cap)
        assert got[f"tiny model cap {cap}"] == plan, (
            f"plan_buckets on the tiny model ({describe(cap_bytes=cap)}): {len(got[f'tiny model cap {cap}'])} buckets, "
            f"expected {len(plan)}")
    assert got["dtypes"] == [[4, 3], [2, 1], [0]], (
        f"plan_buckets(float64, float32, float32, float64, float64 under a large cap) gave {got['dtypes']}: a bucket is "
        "one flat buffer of one dtype")
    assert isinstance(got["cap 0"], str) and got["cap 0"].startswith("ValueError") and "cap" in got["cap 0"], (
        f"plan_buckets(cap_bytes=0) should raise ValueError naming the cap, got {got['cap 0']}")
    for cap, message in student.run(config_errors).items():
        assert message.startswith("ValueError"), f"BucketConfig(bucket_cap_mb={cap}) should raise ValueError: {message}"


@pytest.mark.points(6)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_bucketed_ddp_matches_single_process(shared_run, world_size, compare_tensors):
    """At caps of 1 KiB (one parameter a bucket), 40 KiB and 100 MiB (one bucket), 3 SGD steps of bucketed DDP equal
    single-process training on the concatenated batch, with tied, frozen and unused parameters; the buckets follow
    the plan over the trainable parameters."""
    from autograder.lab03_data_parallel.test_ddp_naive import check_training
    from autograder.lab03_data_parallel.workers import ddp_training, make_model

    variants = ["bucketed:0.001", "bucketed:0.04", "bucketed:100"]
    results = shared_run(ddp_training, world_size, variants, 3, 13)
    trainable_bytes = [w.numel() * 4 for w in make_model(seed=0).parameters() if w.requires_grad]
    for variant in variants:
        cap_mb = float(variant.split(":")[1])
        check_training(results, variant=variant, label=f"BucketedDDP(bucket_cap_mb={cap_mb})", world_size=world_size,
                       steps=3, seed=13, compare=compare_tensors)
        plan = expected_plan(trainable_bytes, int(cap_mb * 2**20))
        for rank, out in enumerate(results):
            got = out[f"{variant} buckets"]
            assert got == plan, (f"BucketedDDP.bucket_indices at bucket_cap_mb={cap_mb} on rank {rank}: {len(got)} "
                                 f"buckets {got}, expected {len(plan)} {plan} (trainable parameters only)")


def launch_points(out: dict) -> list[int]:
    """For each bucket, how many gradients are ready when it (and every earlier bucket) becomes full: the docstring's
    algorithm launches it right then, in the hook of that gradient."""
    bucket_of = {index: b for b, bucket in enumerate(out["bucket_indices"]) for index in bucket}
    missing = [len(bucket) for bucket in out["bucket_indices"]]
    points, launched = [], 0
    for count, name in enumerate(out["ready"], start=1):
        missing[bucket_of[out["names"].index(name)]] -= 1
        while launched < len(missing) and missing[launched] == 0:
            points.append(count)
            launched += 1
    return points


@pytest.mark.points(4)
@pytest.mark.time_limit(90)
def test_communication_overlaps_backward(shared_run):
    """The first bucket's all-reduce is launched while backward is still producing gradients: in the event log, and
    as seen by a wrapped ProcessGroup.allreduce and the test's own gradient hooks."""
    from autograder.lab03_data_parallel.workers import overlap_log

    for rank, out in enumerate(shared_run(overlap_log, 0.02)):
        events = out["events"]
        kinds = [kind for kind, _ in events]
        where = f"rank {rank}, {out['num_buckets']} buckets, event log {events[:6]} ... {events[-4:]}"
        assert out["num_buckets"] >= 3, f"BucketedDDP at bucket_cap_mb=0.02 should make >= 3 buckets ({where})"
        assert kinds.count("launch") == out["num_buckets"] and kinds.count("wait") == out["num_buckets"], (
            f"the event log should hold one 'launch' and one 'wait' per bucket ({where})")
        assert kinds.count("grad_ready") == len(out["ready"]), (
            f"the event log should hold one 'grad_ready' per trainable parameter ({where})")
        first_launch = kinds.index("launch")
        last_ready = len(kinds) - 1 - kinds[::-1].index("grad_ready")
        assert first_launch < last_ready, (
            f"no overlap: the first bucket was launched (event {first_launch}) only after the last gradient was ready "
            f"(event {last_ready}) ({where})")
        assert events[last_ready][1] == out["ready"][-1], (
            f"the last 'grad_ready' should be {out['ready'][-1]}, the last gradient backward produced ({where})")
        during = out["calls_during_backward"]
        assert during and during[0][0] < len(out["ready"]), (
            f"all-reduce was called {len(during)} times during backward, the first with "
            f"{during[0][0] if during else '-'} of {len(out['ready'])} gradients ready: expected a call before "
            f"backward finished ({where})")


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_buckets_launch_in_order_as_soon_as_ready(shared_run):
    """Each bucket is all-reduced in bucket order, as soon as it and every earlier bucket are full: each launch in the
    event log sits where the schedule computed here (from the order the gradients became ready) puts it, and the
    all-reduce calls carry the buckets' sizes in bucket order."""
    from autograder.lab03_data_parallel.workers import overlap_log

    for rank, out in enumerate(shared_run(overlap_log, 0.02)):
        events = out["events"]
        buckets = [f"bucket {b}" for b in range(len(out["bucket_indices"]))]
        launches = [(i, detail) for i, (kind, detail) in enumerate(events) if kind == "launch"]
        assert [detail for _, detail in launches] == buckets, (
            f"rank {rank} launched {[d for _, d in launches]}, expected {buckets}: every rank must launch its buckets "
            "in bucket order")
        waits = [detail for kind, detail in events if kind == "wait"]
        assert waits == buckets, f"rank {rank} waited for {waits}, expected {buckets}"
        ready_before = [sum(kind == "grad_ready" for kind, _ in events[:i]) for i, _ in launches]
        for bucket, (seen, due) in enumerate(zip(ready_before, launch_points(out))):
            # the launch is logged in the hook of the gradient that completed it (before or after its grad_ready)
            assert due - 1 <= seen <= due, (
                f"rank {rank}: bucket {bucket} became ready when {due} gradients were ready, but was launched after "
                f"{seen} (a bucket is launched as soon as it and every earlier bucket are full; event log "
                f"{events[max(0, launches[bucket][0] - 3):launches[bucket][0] + 2]})")
        sizes = [sum(out["sizes"][i] for i in bucket) for bucket in out["bucket_indices"]]
        reduced = [numel for _, numel in out["calls"]]
        assert reduced == sizes, (f"the all-reduce calls on rank {rank} reduced {reduced} elements, expected one call "
                                  f"per bucket in bucket order: {sizes}")


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_bucketed_ddp_parameter_used_on_some_ranks_only(shared_run, compare_tensors):
    """World size 4, unused_head used by rank 0's loss only: rank 0 fills its bucket during backward, the others in
    finish() (with zeros, every step), and all ranks launch their buckets in the same order."""
    from autograder.lab03_data_parallel.test_ddp_naive import check_training, partly_unused_training

    check_training(partly_unused_training(shared_run), variant="bucketed:0.01", world_size=4, steps=2, seed=29,
                   label="BucketedDDP with a parameter used on rank 0 only", partly_unused=True,
                   compare=compare_tensors)


@pytest.mark.points(3)
@pytest.mark.time_limit(90)
def test_no_sync_accumulation_equals_large_batch(shared_run, compare_tensors):
    """Three micro-batches per step, the first two inside no_sync() (which sends nothing), give the large-batch
    gradient, for two optimizer steps in a row."""
    from autograder.lab03_data_parallel.test_ddp_naive import tolerance_dtype
    from autograder.lab03_data_parallel.workers import no_sync_training, reference_accumulation

    results = shared_run(no_sync_training, 3, 2, 17)
    want = reference_accumulation(num_microbatches=3, iterations=2, seed=17, world_size=2, head_in_first_only=False)
    for rank, out in enumerate(results):
        assert out["calls inside no_sync"] == [0, 0], (
            f"BucketedDDP.no_sync(): all-reduce was called {out['calls inside no_sync']} times inside the context "
            f"(rank {rank}); gradients should stay local until the last micro-batch")
        for iteration in range(2):
            compare_tensors(out[f"grads {iteration}"], want[f"grads {iteration}"],
                            name=f"BucketedDDP with no_sync(): gradient of step {iteration + 1}",
                            inputs=describe(world_size=2, rank=rank, num_microbatches=3, local_batch=6),
                            dtype=tolerance_dtype(2))


@pytest.mark.points(2)
@pytest.mark.time_limit(90)
def test_no_sync_gradient_only_in_an_early_microbatch(shared_run, compare_tensors):
    """unused_head gets a gradient in the first micro-batch (inside no_sync()) and none in the last: its hook never
    fires in the synchronised backward, so finish() must all-reduce the gradient it already holds."""
    from autograder.lab03_data_parallel.test_ddp_naive import tolerance_dtype
    from autograder.lab03_data_parallel.workers import no_sync_training, reference_accumulation

    results = shared_run(no_sync_training, 3, 2, 19, head_in_first_only=True)
    want = reference_accumulation(num_microbatches=3, iterations=2, seed=19, world_size=2, head_in_first_only=True)
    for rank, out in enumerate(results):
        for iteration in range(2):
            compare_tensors(out[f"grads {iteration}"], want[f"grads {iteration}"],
                            name=f"BucketedDDP with no_sync(), unused_head used in micro-batch 1 of 3 only: gradient "
                                 f"of step {iteration + 1}",
                            inputs=describe(world_size=2, rank=rank, num_microbatches=3, local_batch=6),
                            dtype=tolerance_dtype(2))
