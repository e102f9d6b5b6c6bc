"""Lab 04, part 6: pipeline stages, micro-batches and the runtime that executes a schedule (pipeline.py).

The runtime's loss (on the last stage) and the gradients gathered from the stages must equal one process training
on the whole batch, for GPipe and 1F1B, with fewer micro-batches than stages too, at world sizes 1, 2 and 4; they
must match torch.distributed.pipelining's ScheduleGPipe and Schedule1F1B; each rank's recorded timeline must follow
its schedule; a failure must name the function, the rank and the micro-batch.
"""

import pytest
import torch

from autograder.lab04_model_parallel.test_schedules import expected_1f1b, expected_gpipe
from autograder.lab04_model_parallel.workers import (assemble, failing_pipeline, microbatches, partitions, pipeline,
                                                     stage_chain, torch_pipeline, tp_pp)
from common.testing import check_close, corpus_batch, describe, gradients, tiny_model


def _expected_partition(num_blocks: int, num_stages: int) -> list[tuple[int, int]]:
    sizes = [num_blocks // num_stages + (1 if s < num_blocks % num_stages else 0) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [(start, start + size) for start, size in zip(starts, sizes)]


@pytest.mark.points(2)
def test_partition_and_microbatches(student):
    """partition_blocks: contiguous stages whose sizes differ by at most one, the larger ones first; more stages
    than blocks raises ValueError naming both. split_microbatches: m equal slices in order; m not dividing the
    batch raises ValueError naming both."""
    cases = [(4, 1), (4, 2), (4, 4), (5, 2), (7, 3), (10, 4), (12, 5), (3, 3)]
    got = student.run(partitions, cases + [(3, 4), (5, 0)])
    for (n, p), bounds in zip(cases, got):
        assert bounds == _expected_partition(n, p), f"partition_blocks({n}, {p}) = {bounds}, expected " \
                                                    f"{_expected_partition(n, p)}"
    for (n, p), message in zip([(3, 4), (5, 0)], got[len(cases):]):
        assert isinstance(message, str) and message.startswith("ValueError") and str(n) in message and str(p) in \
            message, f"partition_blocks({n}, {p}) should raise ValueError naming {n} and {p}, got {message}"
    pieces = student.run(microbatches, 6, 3)
    full = torch.arange(18).view(6, 3)
    assert isinstance(pieces, list) and len(pieces) == 3 and all(
        torch.equal(piece, full[2 * i:2 * i + 2]) for i, piece in enumerate(pieces)), (
        f"split_microbatches(6 x 3, 3) should give rows [0:2], [2:4], [4:6], got {pieces}")
    message = student.run(microbatches, 6, 4)
    assert isinstance(message, str) and message.startswith("ValueError") and "6" in message and "4" in message, (
        f"split_microbatches(batch 6, 4 micro-batches) should raise ValueError naming 6 and 4, got {message}")


@pytest.mark.points(2)
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_stages_cover_the_model(student, num_stages):
    """PipelineStage: the stages hold disjoint parts of the model under its own names (embedding on the first, final
    norm and lm_head on the last, blocks as partition_blocks splits them); run one after another they give the
    model's logits; a bad stage index or tied embeddings over several stages raise ValueError."""
    got = student.run(stage_chain, 5, num_stages, 4)
    model = tiny_model(num_layers=5, seed=4)
    tokens, _ = corpus_batch(batch_size=2, seq_len=7, seed=4)
    check_close(got["logits"], model(tokens).detach(), name=f"{num_stages} PipelineStages run in order (logits)",
                inputs=describe(tokens=tokens, num_layers=5))
    bounds = _expected_partition(5, num_stages)
    for s, names in enumerate(got["names"]):
        want = sorted(n for n, _ in model.named_parameters()
                      if (n.startswith("embed.") and s == 0) or (n.split(".")[0] in ("norm", "lm_head")
                                                                  and s == num_stages - 1)
                      or (n.startswith("blocks.") and bounds[s][0] <= int(n.split(".")[1]) < bounds[s][1]))
        assert names == want, f"PipelineStage {s} of {num_stages} holds {names}, expected {want}"
    assert got["first_last"] == [(s == 0, s == num_stages - 1) for s in range(num_stages)], (
        f"is_first / is_last of the {num_stages} stages: {got['first_last']}")
    assert got["bad_index"].startswith("ValueError"), f"stage_index = num_stages should raise ValueError: " \
                                                      f"{got['bad_index']}"
    assert got["tied"].startswith("ValueError"), f"tied embeddings over 2 stages should raise ValueError: " \
                                                 f"{got['tied']}"


def _single_process(num_layers: int, seed: int, batch_size: int = 4, seq_len: int = 9) -> tuple:
    model = tiny_model(num_layers=num_layers, seed=seed)
    tokens, targets = corpus_batch(batch_size=batch_size, seq_len=seq_len, seed=seed)
    loss = model.loss(tokens, targets)
    loss.backward()
    return loss.detach(), gradients(model)


def _check_pipeline(got_loss, got_grads: list[dict], want_loss, want_grads: dict, *, what: str, where: str) -> None:
    check_close(got_loss, want_loss, name=f"{what}: the loss on the last stage", inputs=where)
    for name, full in want_grads.items():
        holders = [grads[name] for grads in got_grads if name in grads]
        assert len(holders) == 1, f"{what}: {name} is held by {len(holders)} stages, expected 1 ({where})"
        check_close(holders[0], full, name=f"{what}: gradient of {name}", inputs=where)


RUNS = {
    1: (3, [{"schedule": "gpipe", "num_microbatches": 2}, {"schedule": "1f1b", "num_microbatches": 4}]),
    2: (3, [{"schedule": "gpipe", "num_microbatches": 4}, {"schedule": "1f1b", "num_microbatches": 4},
            {"schedule": "1f1b", "num_microbatches": 1}]),
    4: (5, [{"schedule": "gpipe", "num_microbatches": 4}, {"schedule": "1f1b", "num_microbatches": 2},
            {"schedule": "1f1b", "num_microbatches": 4}]),
}


@pytest.mark.points(9)
@pytest.mark.time_limit(200)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_runtime_matches_single_process(student, world_size):
    """PipelineRuntime.step over p = world_size stages (uneven ones too): the last stage's loss and every stage's
    gradients equal one process on the whole batch, for GPipe and 1F1B, m < p included; each rank's timeline
    follows its schedule; only batched point-to-point traffic, m activations forward and m gradients backward."""
    num_layers, runs = RUNS[world_size]
    got = student.run(pipeline, world_size, runs, 41, num_layers)
    p = world_size
    for index, run in enumerate(runs):
        m = run["num_microbatches"]
        what = f"PipelineRuntime ({run['schedule']}, p={p}, m={m})"
        where = describe(tokens=(4, 9), num_layers=num_layers, world_size=p)
        want_loss, want_grads = _single_process(num_layers, 41 + index)
        assert all(out[index]["loss"] is None for out in got[:-1]), f"{what}: only the last stage returns a loss"
        _check_pipeline(got[-1][index]["loss"], [out[index]["grads"] for out in got], want_loss, want_grads,
                        what=what, where=where)
        plan = (expected_gpipe if run["schedule"] == "gpipe" else expected_1f1b)(p, m)
        for r, out in enumerate(got):
            timeline = out[index]["timeline"]
            order = [(kind, i) for kind, i, _, _ in timeline]
            assert order == [(kind, i) for kind, i, _ in plan[r]], (
                f"{what}: rank {r}'s timeline ran {order}, its schedule is {[(k, i) for k, i, _ in plan[r]]}")
            times = [t for _, _, start, end in timeline for t in (start, end)]
            assert times == sorted(times) and all(t >= 0 for t in times), (
                f"{what}: rank {r}'s timeline times must be non-negative and increasing: {timeline}")
            sends = [nbytes for kind, nbytes, _ in out[index]["p2p"] if kind == "isend"]
            receives = [nbytes for kind, nbytes, _ in out[index]["p2p"] if kind == "irecv"]
            count = m * (r < p - 1) + m * (r > 0)
            activation = (4 // m) * 9 * 64 * 8
            assert sends == [activation] * count and receives == [activation] * count, (
                f"{what}: rank {r} should send and receive {count} activations or gradients of {activation} bytes "
                f"through batch_isend_irecv; it sent {sends} and received {receives}")
            assert not out[index]["other_calls"], (
                f"{what}: rank {r} called {out[index]['other_calls']}; a pipeline step needs only "
                "batch_isend_irecv")


@pytest.mark.points(3)
@pytest.mark.time_limit(200)
def test_runtime_matches_torch_pipelining(student):
    """The runtime and torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B) on the same stages: the same loss
    and gradients, both equal to one process's; with slow stages, the two stages' actions overlap in time."""
    got = student.run(torch_pipeline, 2, 4, 43)
    want_loss, want_grads = _single_process(4, 43)
    for schedule, peer in (("gpipe", "ScheduleGPipe"), ("1f1b", "Schedule1F1B")):
        where = describe(tokens=(4, 9), num_layers=4, world_size=2, num_microbatches=4)
        for source in ("torch", "ours"):
            what = f"PipelineRuntime ({schedule})" if source == "ours" else f"torch's {peer} (the peer)"
            _check_pipeline(got[-1][schedule][source]["loss"], [out[schedule][source]["grads"] for out in got],
                            want_loss, want_grads, what=what, where=where)
        for r, out in enumerate(got):
            for name, theirs in out[schedule]["torch"]["grads"].items():
                check_close(out[schedule]["ours"]["grads"][name], theirs,
                            name=f"PipelineRuntime ({schedule}) against {peer}: gradient of {name} on rank {r}",
                            inputs=where)
    # the sends go out as soon as the next action starts, not at the next receive: stages overlap
    first, last = ({(kind, i): (start, end) for kind, i, start, end in out["overlap"]} for out in got)
    assert first_and_last_overlap(first, last), (
        "PipelineRuntime (GPipe, 2 stages, m = 3, every action slowed to 0.2 s): the stages did not overlap. The "
        "last stage should start F0 before the first stage ends F2, and the first stage B0 before the last stage ends "
        "B2; a send queued by one action must start when the rank's next action starts, even one that receives "
        f"nothing (_flush). Timelines: first stage {first}, last stage {last}")


def first_and_last_overlap(first: dict, last: dict) -> bool:
    return last[("F", 0)][0] < first[("F", 2)][1] and first[("B", 0)][0] < last[("B", 2)][1]


@pytest.mark.points(2)
@pytest.mark.time_limit(200)
def test_failure_names_rank_and_microbatch(student):
    """A stage that raises in the forward of micro-batch 2 on rank 1: the error names PipelineRuntime.step, rank 1,
    micro-batch 2, and the original error; the other rank does not hang the test."""
    message = student.run(failing_pipeline, 2, 1, 2)
    for part in ("PipelineRuntime.step", "rank 1", "micro-batch 2", "injected failure"):
        assert part in message, f"the pipeline's error should name {part!r}; it was:\n{message[-1500:]}"


@pytest.mark.points(3)
@pytest.mark.time_limit(200)
def test_tensor_and_pipeline_parallel(student):
    """tp = 2 x pp = 2: a 1F1B pipeline whose stages are tensor-parallel (vocab-parallel loss on the last stage)
    gives the single-process loss and, gathered over both axes, the single-process gradients."""
    got = student.run(tp_pp, 4, 2, 47)
    want_loss, want_grads = _single_process(4, 47)
    model = tiny_model(num_layers=4, seed=47)
    where = describe(tokens=(4, 9), num_layers=4, tp=2, pp=2, num_microbatches=2)
    for out in got:
        if out["pp_rank"] == 1:
            check_close(out["loss"], want_loss, name="tp x pp pipeline: the loss on the last stage", inputs=where)
    for name, full in want_grads.items():
        for pp_rank in (0, 1):
            shards = [out["grads"].get(name) for out in got if out["pp_rank"] == pp_rank]
            if all(shard is None for shard in shards):
                continue
            check_close(assemble(name, shards, model.config, 2), full,
                        name=f"tp x pp pipeline: gradient of {name} (stage {pp_rank}, gathered over tp)", inputs=where)
            break
        else:
            raise AssertionError(f"tp x pp pipeline: no stage holds {name}")
