"""Lab 04, part 5: pipeline schedules as pure functions, and their discrete-event simulation (schedules.py).

No processes: the schedules are lists of actions, compared with the rules the docstrings state (written out here
independently), and the simulation is held to the closed forms: bubble (p-1)/(v m+p-1), makespan (m+p-1)(t_F+t_B),
peak in-flight m (GPipe) and min(p-r, m) (1F1B).
"""

import math

import pytest

SIZES = [(1, 1), (1, 5), (2, 1), (2, 2), (2, 7), (3, 2), (3, 8), (4, 1), (4, 3), (4, 4), (4, 9), (5, 12), (8, 3),
         (8, 16)]


# -----------------------------------------------------------------------------
# Producers (run in the worker)


def _plan(name: str, p: int, m: int, v: int):
    from lab04_model_parallel import schedules

    if name == "interleaved":
        return schedules.interleaved_one_f_one_b(p, m, v)
    return {"gpipe": schedules.gpipe, "1f1b": schedules.one_f_one_b}[name](p, m)


def schedule_actions(cases: list[tuple]) -> list[list[list[tuple[str, int, int]]]]:
    """For each (name, p, m, v): every rank's actions as (kind, micro-batch, stage)."""
    return [[[(a.kind, a.microbatch, a.stage) for a in actions] for actions in _plan(*case)] for case in cases]


def simulated(cases: list[tuple]) -> list[dict]:
    """For each (name, p, m, v, forward_time, backward_time): the simulation's figures and timelines."""
    from lab04_model_parallel.schedules import simulate

    out = []
    for name, p, m, v, forward_time, backward_time in cases:
        sim = simulate(_plan(name, p, m, v), forward_time=forward_time, backward_time=backward_time)
        out.append({"makespan": sim.makespan, "bubble": sim.bubble, "peak": list(sim.peak_in_flight),
                    "timelines": [[(start, end, a.kind, a.microbatch, a.stage) for start, end, a in timeline]
                                  for timeline in sim.timelines]})
    return out


def simulate_raw(plan: list[list[tuple[str, int, int]]]) -> dict:
    from lab04_model_parallel.schedules import Action, simulate

    sim = simulate([[Action(*a) for a in actions] for actions in plan])
    return {"bubble": sim.bubble, "makespan": sim.makespan}


def schedule_error(name: str, *args) -> str:
    from lab04_model_parallel import schedules

    try:
        getattr(schedules, name)(*args)
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return "no error"


# -----------------------------------------------------------------------------
# The rules, written out independently


def expected_gpipe(p: int, m: int) -> list[list[tuple[str, int, int]]]:
    return [[("F", i, r) for i in range(m)] + [("B", i, r) for i in range(m)] for r in range(p)]


def expected_1f1b(p: int, m: int) -> list[list[tuple[str, int, int]]]:
    plan = []
    for r in range(p):
        w = min(p - r - 1, m)
        forwards = [("F", i, r) for i in range(m)]
        backwards = [("B", i, r) for i in range(m)]
        order = forwards[:w]
        for k in range(m - w):
            order += [forwards[w + k], backwards[k]]
        plan.append(order + backwards[m - w:])
    return plan


def expected_interleaved(p: int, m: int, v: int) -> list[list[tuple[str, int, int]]]:
    """Rounds of p micro-batches per chunk (chunks reversed for backwards); warm-up 2(p-r-1) + (v-1)p, capped."""
    forwards, backwards = [], []
    for group in range(m // p):
        for chunk in range(v):
            forwards += [(group * p + k, chunk) for k in range(p)]
            backwards += [(group * p + k, v - 1 - chunk) for k in range(p)]
    plan = []
    for r in range(p):
        w = min(2 * (p - r - 1) + (v - 1) * p, m * v)
        order = [("F", i, c * p + r) for i, c in forwards[:w]]
        for k in range(m * v - w):
            order += [("F", forwards[w + k][0], forwards[w + k][1] * p + r),
                      ("B", backwards[k][0], backwards[k][1] * p + r)]
        plan.append(order + [("B", i, c * p + r) for i, c in backwards[m * v - w:]])
    return plan


def check_timeline(got: dict, p: int, forward_time: float, backward_time: float, chunks: int, what: str) -> None:
    """Each rank's actions do not overlap, last as long as they should, and start after their dependencies."""
    ends = {}
    for r, timeline in enumerate(got["timelines"]):
        for start, end, kind, i, s in timeline:
            ends[(kind, i, s)] = (start, end)
    num_stages = p * chunks
    for r, timeline in enumerate(got["timelines"]):
        previous_end = 0.0
        for start, end, kind, i, s in timeline:
            length = (forward_time if kind == "F" else backward_time) / chunks
            assert math.isclose(end - start, length), f"{what}: {kind}{i}@{s} on rank {r} lasted {end - start}"
            assert start >= previous_end - 1e-12, f"{what}: {kind}{i}@{s} on rank {r} overlaps the previous action"
            previous_end = end
            needs = ([("F", i, s - 1)] if kind == "F" and s > 0 else []) + (
                [("F", i, s)] + ([("B", i, s + 1)] if s < num_stages - 1 else []) if kind == "B" else [])
            for need in needs:
                assert ends[need][1] <= start + 1e-12, (
                    f"{what}: {kind}{i}@{s} on rank {r} starts at {start} before {need} ends ({ends[need][1]})")
    assert math.isclose(got["makespan"], max(t[-1][1] for t in got["timelines"] if t)), (
        f"{what}: the makespan {got['makespan']} is not the last action's end")


# -----------------------------------------------------------------------------
# Tests


@pytest.mark.points(2)
def test_gpipe_schedule(student):
    """gpipe(p, m): every rank runs F(0..m-1) then B(0..m-1) through its own stage, for many (p, m), m < p too."""
    every = student.run(schedule_actions, [("gpipe", p, m, 1) for p, m in SIZES])
    for (p, m), got in zip(SIZES, every):
        want = expected_gpipe(p, m)
        for r in range(p):
            assert got[r] == want[r], f"gpipe({p}, {m}) on rank {r}: got {got[r]}, expected {want[r]}"


@pytest.mark.points(3)
def test_one_f_one_b_schedule(student):
    """one_f_one_b(p, m): rank r runs min(p-r-1, m) warm-up forwards, then F/B pairs, then the remaining backwards,
    for many (p, m), m < p too."""
    every = student.run(schedule_actions, [("1f1b", p, m, 1) for p, m in SIZES])
    for (p, m), got in zip(SIZES, every):
        want = expected_1f1b(p, m)
        for r in range(p):
            assert got[r] == want[r], f"one_f_one_b({p}, {m}) on rank {r}: got {got[r]}, expected {want[r]}"


@pytest.mark.points(4)
def test_simulated_bubble_and_peak_in_flight(student):
    """simulate: for GPipe and 1F1B at many (p, m) and several t_B / t_F, the bubble is exactly (p-1)/(m+p-1), the
    makespan (m+p-1)(t_F+t_B), the peak in flight m (GPipe) and min(p-r, m) on rank r (1F1B); every action lasts
    its duration, after its dependencies, without overlapping its rank's previous one."""
    cases = [(name, p, m, 1, forward_time, backward_time) for name in ("gpipe", "1f1b") for p, m in SIZES
             for forward_time, backward_time in ((1.0, 2.0), (1.0, 1.0), (0.5, 1.75))]
    for (name, p, m, _, forward_time, backward_time), got in zip(cases, student.run(simulated, cases)):
        what = f"simulate({name}({p}, {m}), forward_time={forward_time}, backward_time={backward_time})"
        assert math.isclose(got["bubble"], (p - 1) / (m + p - 1), abs_tol=1e-12), (
            f"{what}: bubble {got['bubble']:.6f}, expected (p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.6f}")
        assert math.isclose(got["makespan"], (m + p - 1) * (forward_time + backward_time)), (
            f"{what}: makespan {got['makespan']}, expected (m+p-1)(t_F+t_B) = "
            f"{(m + p - 1) * (forward_time + backward_time)}")
        peak = [m] * p if name == "gpipe" else [min(p - r, m) for r in range(p)]
        assert got["peak"] == peak, f"{what}: peak in flight {got['peak']}, expected {peak}"
        check_timeline(got, p, forward_time, backward_time, 1, what)


@pytest.mark.points(2)
def test_simulate_rejects_bad_schedules(student):
    """A schedule that misses an action, repeats one, puts a stage on another rank, or deadlocks raises ValueError;
    the deadlock's message names the waiting rank."""
    good = expected_1f1b(2, 2)
    cases = {
        "missing": [good[0], good[1][:-1]],
        "repeated": [good[0] + [("F", 0, 0)], good[1]],
        "wrong rank": [good[1], good[0]],
        # rank 0 waits in B0 for rank 1, which waits in F1 for rank 0's F1, queued after B0
        "deadlock": [[("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0)],
                     [("F", 1, 1), ("B", 1, 1), ("F", 0, 1), ("B", 0, 1)]],
    }
    sane = student.run(simulate_raw, good)
    assert math.isclose(sane["bubble"], 1 / 3), f"simulate(one_f_one_b(2, 2)) gave bubble {sane['bubble']}"
    for what, plan in cases.items():
        with pytest.raises(ValueError) as error:
            student.run(simulate_raw, plan)
        if what == "deadlock":
            assert "rank 0" in str(error.value) or "rank 1" in str(error.value), (
                f"the deadlock error should name the waiting rank: {error.value}")
        if what == "wrong rank":
            assert "rank 0" in str(error.value) and "rank 1" in str(error.value), (
                f"giving rank 0 the actions of stage 1 should raise an error naming rank 0 and the stage's rank 1: "
                f"{error.value}")
    assert student.run(schedule_error, "gpipe", 0, 3).startswith("ValueError")
    assert student.run(schedule_error, "one_f_one_b", 3, 0).startswith("ValueError")


@pytest.mark.points(4)
def test_interleaved_one_f_one_b(student):
    """Challenge: interleaved 1F1B with v chunks per rank follows the documented order (virtual stage c p + r on rank
    r, rounds of p micro-batches per chunk, 2(p-r-1) + (v-1)p warm-up forwards), does not deadlock, and its simulated
    bubble is (p-1)/(v m+p-1); m not divisible by p raises ValueError naming both."""
    sizes = [(2, 2, 2), (2, 6, 3), (3, 6, 2), (4, 4, 2), (4, 8, 3), (4, 12, 1), (2, 4, 4)]
    plans = student.run(schedule_actions, [("interleaved", p, m, v) for p, m, v in sizes])
    sims = student.run(simulated, [("interleaved", p, m, v, 1.0, 2.0) for p, m, v in sizes])
    for (p, m, v), plan, got in zip(sizes, plans, sims):
        what = f"interleaved_one_f_one_b({p}, {m}, {v})"
        assert len(plan) == p, f"{what}: {len(plan)} ranks"
        want = expected_interleaved(p, m, v)
        for r, actions in enumerate(plan):
            stages = {s for _, _, s in actions}
            assert stages == {c * p + r for c in range(v)}, f"{what}: rank {r} runs stages {sorted(stages)}"
            assert len(actions) == 2 * m * v == len(set(actions)), f"{what}: rank {r} has {len(actions)} actions"
            assert actions == want[r], f"{what}: rank {r} runs {actions}, the documented order is {want[r]}"
        assert math.isclose(got["bubble"], (p - 1) / (v * m + p - 1), abs_tol=1e-12), (
            f"simulate({what}): bubble {got['bubble']:.6f}, expected (p-1)/(v m+p-1) = "
            f"{(p - 1) / (v * m + p - 1):.6f}")
        check_timeline(got, p, 1.0, 2.0, v, f"simulate({what})")
    message = student.run(schedule_error, "interleaved_one_f_one_b", 4, 6, 2)
    assert message.startswith("ValueError") and "6" in message and "4" in message, (
        f"interleaved_one_f_one_b(4, 6, 2) should raise ValueError naming 6 and 4: {message}")
