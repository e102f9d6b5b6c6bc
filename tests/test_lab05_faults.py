"""Lab 05's distributed tests under faults: a rank that raises, ranks that deadlock and code that assumes the wrong
world size each cost the one test that runs them, with a message that says what happened, and nothing else.

The faults go into `save_checkpoint`/`checkpoint_state` on ranks or world sizes that only the public reshard test
(2 -> 4 -> 2 ranks) uses; the part's other tests (chunk_range, and the hidden one-rank round trip) keep full marks.
"""

import json
import time
from pathlib import Path

import pytest

from kit_helpers import make_submission, run_cli

RESHARD = "test_checkpoint_reshards_two_to_four_to_two"
SAVE = "    dcp.save(checkpoint_state(engine), checkpoint_id=path)\n"
WORLD = "    world_size, rank = dist.get_world_size(group), dist.get_rank(group)\n    device ="

FAULTS = {
    # rank 1 raises: the message names the rank and carries its exception
    "failing_rank": ({"checkpoint.py": (SAVE, "    if dist.get_rank(engine.group) == 1:\n"
                                              "        raise RuntimeError('rank one gives up')\n" + SAVE)},
                     ["rank 1 of 2 raised RuntimeError: rank one gives up"]),
    # rank 1 skips the save, whose collectives then wait for it for ever: run_distributed's limit names the ranks
    "deadlock": ({"checkpoint.py": (SAVE, "    if dist.get_rank(engine.group) == 1:\n        return\n" + SAVE)},
                 ["did not finish within", "deadlock"]),
    # the code assumes at most two ranks: at four, the chunks it describes are not the ones DCP expects
    "wrong_world_size": ({"checkpoint.py": (WORLD, "    world_size, rank = min(2, dist.get_world_size(group)), "
                                                   "dist.get_rank(group)\n    device =")},
                         ["of 4 raised"]),
}


def _grade(target: Path, tmp_path: Path, scale: float) -> tuple[list[dict], float]:
    results = tmp_path / "results.json"
    start = time.monotonic()
    # a deadlock is caught by the producer's own limit (run_distributed's 200 s times the scale, which the grader
    # passes to the worker), inside the test's (300 s times the scale)
    proc = run_cli("grade", "05", "--target", str(target), "--tests", "test_checkpoint.py", "--json", str(results),
                   "--time-limit-scale", str(scale))
    assert proc.returncode == 0, f"the grader itself failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(results.read_text())["tests"], time.monotonic() - start


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_fault_costs_one_test_with_a_clear_message(kind, tmp_path):
    edits, messages = FAULTS[kind]
    # the deadlock waits out its limit: a third of the usual (70 s, not 200 s) keeps CI short and still leaves the
    # part's other tests (a few seconds each) far inside theirs
    scale = 0.35 if kind == "deadlock" else 1.0
    tests, elapsed = _grade(make_submission(tmp_path, lab="lab05_zero", replace=edits), tmp_path, scale)
    broken = [t for t in tests if t["name"].endswith(RESHARD)]
    others = [t for t in tests if not t["name"].endswith(RESHARD)]
    assert len(broken) == 1 and others, [t["name"] for t in tests]
    assert broken[0]["score"] == 0, f"{kind}: the reshard test scored {broken[0]['score']}"
    for message in messages:
        assert message in broken[0]["output"], f"{kind}: {message!r} not in the message:\n{broken[0]['output']}"
    if kind == "deadlock":  # the producer's limit was scaled with the test's: 200 s x 0.35
        assert "within 70 s" in broken[0]["output"], broken[0]["output"]
    for test in others:
        assert test["score"] == test["max_score"] > 0, f"{kind}: {test['name']} lost points:\n{test['output']}"
    assert elapsed < 900, f"{kind}: grading took {elapsed:.0f} s"
