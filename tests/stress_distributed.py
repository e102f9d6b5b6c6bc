"""Run the distributed tests many times under load and count the runs with no failure (issue 8, flaky gloo).

    python tests/stress_distributed.py --launcher-runs 40 --lab-runs 10 --hogs 2

Beside `--hogs` CPU hogs (`python -c 'while True: pass'`, killed at the end), it repeats:
- the launcher tests of tests/test_common.py (every test that starts ranks), `--launcher-runs` times;
- the grading of lab 03 against the reference (every distributed test, hidden ones included), `--lab-runs` times;
and prints, for each, how many runs passed entirely and what the failures said. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KIT_ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_TESTS = "run_distributed or rank_exception or deadlock or hard_exit or planned_deaths or mesh"


def launcher_run() -> str | None:
    """None when every launcher test passed, else the tail of pytest's report."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_common.py", "-q", "-k", LAUNCHER_TESTS,
                           "-p", "no:cacheprovider"], cwd=KIT_ROOT, capture_output=True, text=True, timeout=1800)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr)[-1500:]


def lab_run(lab: str) -> str | None:
    """None when the reference got every point graded here, else the failing tests and their messages."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "results.json"
        proc = subprocess.run([sys.executable, "-m", "autograder", "grade", lab, "--target", "reference", "--json",
                               str(out)], cwd=KIT_ROOT, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            return (proc.stdout + proc.stderr)[-1500:]
        tests = json.loads(out.read_text())["tests"]
    lost = [t for t in tests if t["score"] < t["max_score"] and "not graded here" not in t.get("output", "")]
    return None if not lost else "\n".join(f"{t['name']}: {t['output'][:600]}" for t in lost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher-runs", type=int, default=40)
    parser.add_argument("--lab-runs", type=int, default=10)
    parser.add_argument("--lab", default="03")
    parser.add_argument("--hogs", type=int, default=2)
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    tallies = {}
    try:
        for name, runs, once in (("launcher tests", args.launcher_runs, launcher_run),
                                 (f"lab {args.lab} grading", args.lab_runs, lambda: lab_run(args.lab))):
            passed, failures = 0, []
            for index in range(runs):
                start = time.monotonic()
                failure = once()
                passed += failure is None
                if failure is not None:
                    failures.append(failure)
                print(f"[stress] {name} run {index + 1}/{runs}: {'ok' if failure is None else 'FAILED'} "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
                if failure is not None:
                    print(failure, flush=True)
            tallies[name] = (passed, runs, failures)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for name, (passed, runs, _) in tallies.items():
        print(f"{name}: {passed} of {runs} runs with no failure, beside {args.hogs} CPU hogs (load {load:.1f})")


if __name__ == "__main__":
    main()
