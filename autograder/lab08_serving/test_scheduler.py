"""Lab 08, part 6: the scheduler (scheduler.py): continuous batching under a token budget and a finite cache.

The producer plays the engine without a model: each scheduled sequence gets one made-up token per step (a prefill
its first output token, as in the engine), and a sequence that has produced its output length finishes. The grader
replays the trace against the documented policy: every step within the token budget, the running limit and the
cache; every running sequence decodes in every step unless preempted; preemption takes the newest; admission is first
come, first served, never in a step that preempted, and stops only at a sequence that does not fit.
"""

import pytest

# -----------------------------------------------------------------------------
# Producers: run in the worker


def simulate(requests: list[tuple[int, int, int]], *, num_blocks: int, block_size: int, max_num_seqs: int,
             max_num_batched_tokens: int, max_steps: int = 400) -> dict:
    """requests: (prompt length, output length, arrival step). Returns the trace of every step."""
    from lab08_serving.block_manager import BlockManager, BlockManagerConfig
    from lab08_serving.scheduler import Scheduler, SchedulerConfig, Sequence

    manager = BlockManager(BlockManagerConfig(num_blocks=num_blocks, block_size=block_size))
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
                          manager)
    seqs, trace = {}, []
    for step_index in range(max_steps):
        for index, (prompt_len, _, arrival) in enumerate(requests):
            if arrival == step_index:
                seqs[index] = Sequence(seq_id=index, token_ids=[(index * 31 + j) % 97 for j in range(prompt_len)])
                scheduler.add(seqs[index])
        if not scheduler.has_unfinished() and step_index > max(r[2] for r in requests):
            break
        step = scheduler.schedule()
        record = {"prefills": [(s.seq_id, s.num_tokens, s.num_cached_tokens) for s in step.prefills],
                  "decodes": [s.seq_id for s in step.decodes], "preempted": [s.seq_id for s in step.preempted],
                  "num_batched_tokens": step.num_batched_tokens, "free": manager.num_free_blocks,
                  "held": {s: len(t) for s, t in manager.block_tables.items()},
                  "stored": {s: list(t) for s, t in manager.token_ids.items()},
                  "waiting": [s.seq_id for s in scheduler.waiting]}
        for seq in step.prefills + step.decodes:
            seq.token_ids.append((seq.seq_id * 7 + seq.num_tokens) % 97)
            if len(seq.output_token_ids) >= requests[seq.seq_id][1]:
                scheduler.finish(seq)
        record["running"] = [s.seq_id for s in scheduler.running]
        trace.append(record)
    return {"trace": trace, "outputs": {i: len(s.output_token_ids) for i, s in seqs.items()},
            "statuses": {i: s.status.value for i, s in seqs.items()}, "free": manager.num_free_blocks}


# -----------------------------------------------------------------------------
# The grader's replay


def _token(seq: int, position: int, requests) -> int:
    """The token the simulation puts at a position: the prompt's, then one made-up token per step."""
    return (seq * 31 + position) % 97 if position < requests[seq][0] else (seq * 7 + position) % 97


def _replay(requests, result, *, num_blocks, block_size, max_num_seqs, max_num_batched_tokens) -> int:
    """Check every step against the policy; returns the number of preemptions."""
    trace = result["trace"]
    assert trace, "the simulation ran no step"
    running: list[int] = []  # oldest first, as the grader tracks it
    queue: list[int] = []  # the waiting order the policy implies
    lengths = {i: r[0] for i, r in enumerate(requests)}  # tokens each sequence holds (prompt + output so far)
    produced = {i: 0 for i in range(len(requests))}
    preemptions = 0
    for step, record in enumerate(trace):
        where = f"step {step}"
        queue += [i for i, r in enumerate(requests) if r[2] == step]
        decodes, preempted = record["decodes"], record["preempted"]
        prefill_ids = [p[0] for p in record["prefills"]]
        # preemption takes the newest running sequences; everything else running decodes, oldest first
        assert preempted == running[len(running) - len(preempted):][::-1], (
            f"{where}: preempted {preempted}, but preemption must take the newest running sequences "
            f"(running oldest first: {running})")
        assert decodes == running[:len(running) - len(preempted)], (
            f"{where}: decoded {decodes}; every running sequence not preempted must decode, oldest first ({running})")
        for seq in preempted:
            queue.insert(0, seq)
        preemptions += len(preempted)
        # admission: first come, first served, none in a step that preempted
        assert not (preempted and prefill_ids), f"{where}: admitted {prefill_ids} in a step that preempted"
        assert prefill_ids == queue[:len(prefill_ids)], (
            f"{where}: admitted {prefill_ids}, but the waiting order is {queue} (first come, first served)")
        for seq_id, num_tokens, _ in record["prefills"]:
            assert num_tokens == lengths[seq_id], (
                f"{where}: sequence {seq_id} prefilled {num_tokens} tokens, it holds {lengths[seq_id]} "
                "(after a preemption: its prompt and its output so far)")
        queue = queue[len(prefill_ids):]
        used = sum(lengths[s] for s in prefill_ids) + len(decodes)
        assert used <= max_num_batched_tokens, (
            f"{where}: {used} tokens scheduled, the budget is {max_num_batched_tokens}")
        assert record["num_batched_tokens"] <= max_num_batched_tokens, f"{where}: num_batched_tokens over the budget"
        now_running = decodes + prefill_ids
        assert len(now_running) <= max_num_seqs, f"{where}: {len(now_running)} running, max_num_seqs {max_num_seqs}"
        # the cache: every holder has exactly the blocks its tokens need, and they fit
        # a decode stores the token it feeds: the cache holds every token of every running sequence, in order
        expected_stored = {s: [_token(s, p, requests) for p in range(lengths[s])] for s in now_running}
        assert record["stored"] == expected_stored, (
            f"{where}: the block manager holds the tokens {record['stored']}, expected {expected_stored}")
        for seq, count in record["held"].items():
            assert count == -(-len(record["stored"][seq]) // block_size), (
                f"{where}: sequence {seq} holds {count} blocks")
        assert record["free"] == num_blocks - sum(record["held"].values()) >= 0, f"{where}: free blocks miscounted"
        # admission stops only at a sequence that does not fit
        if queue and not preempted:
            nxt = queue[0]
            fits = (len(now_running) + 1 <= max_num_seqs and used + lengths[nxt] <= max_num_batched_tokens
                    and -(-lengths[nxt] // block_size) <= record["free"])
            assert not fits, f"{where}: sequence {nxt} was left waiting though it fit (running {now_running}, " \
                             f"{used} tokens scheduled, {record['free']} blocks free)"
        # the step's tokens
        running = []
        for seq in now_running:
            lengths[seq] += 1
            produced[seq] += 1
            if produced[seq] < requests[seq][1]:
                running.append(seq)
        assert record["running"] == running, f"{where}: running after the step {record['running']}, expected {running}"
    assert all(s == "finished" for s in result["statuses"].values()), f"unfinished sequences: {result['statuses']}"
    assert result["outputs"] == {i: r[1] for i, r in enumerate(requests)}, f"output lengths {result['outputs']}"
    assert result["free"] == num_blocks, f"{result['free']} blocks free at the end, expected all {num_blocks}"
    return preemptions


# -----------------------------------------------------------------------------
# Tests: run in the grader

STEADY = [(5, 4, 0), (9, 7, 0), (3, 12, 0), (14, 3, 1), (2, 9, 2), (6, 5, 2), (11, 6, 5), (4, 8, 9)]


@pytest.mark.points(3)
def test_continuous_batching_with_room(student):
    """A cache with room for everything: sequences join as they arrive and leave when done, mixed prefill and decode
    steps, never a preemption."""
    setup = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    result = student.run(simulate, STEADY, **setup)
    assert _replay(STEADY, result, **setup) == 0, "preempted although the cache had room"
    mixed = [r for r in result["trace"] if r["prefills"] and r["decodes"]]
    assert mixed, "no step ran prefills and decodes together: new requests must join between decode steps"


@pytest.mark.points(2)
@pytest.mark.parametrize("max_num_seqs, max_num_batched_tokens", [(3, 20), (6, 16)])
def test_token_budget_and_running_limit(student, max_num_seqs, max_num_batched_tokens):
    """Few running slots, or a token budget that binds before them: admission waits for room, in arrival order."""
    setup = dict(num_blocks=64, block_size=4, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    result = student.run(simulate, STEADY, **setup)
    _replay(STEADY, result, **setup)


@pytest.mark.points(3)
@pytest.mark.parametrize("num_blocks, block_size", [(8, 4), (6, 3), (11, 2)])
def test_preemption_when_the_cache_runs_out(student, num_blocks, block_size):
    """A cache too small for all requests at once: the newest running sequences are preempted (their blocks freed),
    wait at the front, and are recomputed over prompt and output; every request still finishes."""
    requests = [(4, 12, 0), (3, 14, 0), (5, 10, 0), (2, 9, 1), (4, 11, 3)]
    setup = dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=4, max_num_batched_tokens=32)
    result = student.run(simulate, requests, **setup)
    assert _replay(requests, result, **setup) > 0, "no preemption, though the requests outgrow the cache"
