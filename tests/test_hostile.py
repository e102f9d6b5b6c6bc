"""Hostile and broken submissions: each costs only the tests that touch the broken code, within its time bound, and
leaves no process behind. The broken function is lab 01's `predict_saved_bytes` (used only by test_memory.py), so
test_accumulation.py must keep full marks in every case."""

import json
import os
import time
from pathlib import Path

import pytest

from kit_helpers import run_cli

TARGET_LINE = "    saved = baseline_bytes\n"
MARK = "kit-hostile-fixture-sleeper"


def _grade(submission_dir: Path, tmp_path: Path) -> tuple[dict, float]:
    results = tmp_path / "results.json"
    start = time.monotonic()
    # time limits scaled to 0.15 (9 s a test): the reference's tests need well under a second each
    proc = run_cli("grade", "01", "--target", str(submission_dir), "--tests", "test_memory.py", "test_accumulation.py",
                   "--json", str(results), env={"SLM_TIME_LIMIT_SCALE": "0.15"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"the grader itself failed on a hostile submission:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(results.read_text()), elapsed


def _by_file(report: dict) -> tuple[list[dict], list[dict]]:
    memory = [t for t in report["tests"] if "predict_saved_bytes" in t["name"] or "saved_bytes_drop" in t["name"]]
    others = [t for t in report["tests"] if t not in memory]
    return memory, others


def _leftover_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if MARK in cmdline and "pytest" not in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


HOSTILE = {
    "hang": ("while True:\n        pass\n", "timed out"),
    "segfault": ("import ctypes\n    ctypes.string_at(0)\n", "killed by signal SIGSEGV"),
    "os_exit": ("import os\n    os._exit(3)\n", "exited with code 3"),
    "sys_exit": ("import sys\n    sys.exit(0)\n", "SystemExit"),
    "huge_output": ("import sys\n    while True:\n        sys.stdout.write('x' * 1_000_000)\n", "output"),
    "deadlock": (
        "import datetime, subprocess, sys\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{MARK}'])\n"
        "    import torch.distributed as dist\n"
        "    store = dist.TCPStore('127.0.0.1', 0, 2, is_master=True, wait_for_workers=False)\n"
        "    dist.init_process_group('gloo', store=store, rank=0, world_size=2, timeout=datetime.timedelta(hours=1))\n",
        "timed out",
    ),
    "patches_the_grader": (
        "import torch\n    torch.Tensor.abs = lambda self: self * 0\n    torch.Tensor.__eq__ = lambda self, other: True\n"
        "    return torch.tensor(0)\n",
        "patched library functions",
    ),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_submission_costs_only_its_own_tests(kind, submission, tmp_path):
    body, expected_message = HOSTILE[kind]
    sub = submission(replace={"memory.py": (TARGET_LINE, "    " + body + TARGET_LINE)})
    report, elapsed = _grade(sub, tmp_path)
    broken, others = _by_file(report)
    assert broken and others
    for test in broken:
        assert test["score"] == 0, f"{kind}: {test['name']} scored {test['score']} despite the broken code"
        assert expected_message in test["output"], f"{kind}: unexpected message for {test['name']}:\n{test['output']}"
    for test in others:
        assert test["score"] == test["max_score"] > 0, f"{kind}: {test['name']} lost its points:\n{test['output']}"
    # two broken tests at 9 s each at most, plus start-up: well under a minute even on a loaded 2-core machine
    assert elapsed < 90, f"{kind}: grading took {elapsed:.0f} s"
    assert not _leftover_processes(), f"{kind}: processes left behind: {_leftover_processes()}"


def test_patching_check_close_in_the_submission_is_caught(submission, tmp_path):
    """Replacing common.testing.check_close from student code (at import) cannot turn a wrong answer into a pass."""
    sub = submission(replace={"accumulation.py": (
        "IGNORE_INDEX = -100",
        "import common.testing\ncommon.testing.check_close = lambda *args, **kwargs: None\nIGNORE_INDEX = -100")})
    sub_file = sub / "lab01_memory" / "accumulation.py"
    # and make the accumulation wrong: normalise by the micro-batch count instead of the token count
    text = sub_file.read_text().replace("reduction=\"sum\") / total_tokens", "reduction=\"mean\") / num_microbatches")
    sub_file.write_text(text)
    report, _ = _grade(sub, tmp_path)
    uneven = [t for t in report["tests"] if "uneven_token_counts" in t["name"]]
    assert uneven and all(t["score"] == 0 for t in uneven), [t["output"][:300] for t in uneven]


def test_missing_lab_is_reported_not_borrowed(tmp_path):
    """A submission without lab01_memory/ fails every test with a clear message (never falls through to reference/)."""
    (tmp_path / "empty").mkdir()
    results = tmp_path / "r.json"
    proc = run_cli("grade", "01", "--target", str(tmp_path / "empty"), "--tests", "test_plans.py", "--json", str(results))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    assert report["score"] == 0 and report["max_score"] > 0
    assert all("has no package lab01_memory" in t["output"] for t in report["tests"])
