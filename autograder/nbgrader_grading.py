"""nbgrader autograding that the notebook cannot fool: each graded cell is re-graded outside the student's kernel.

nbgrader runs a submitted notebook top to bottom in a kernel, and reads each locked test cell's value as its partial
credit. Everything in that kernel is the student's: a cell above can set SLM_TARGET=reference, replace
`grade_part`, patch `subprocess`. So the course's autograde pipeline (nbgrader_config.py) adds `TrustedGrades` right
after nbgrader's Execute step. For every locked graded cell it reads the part from the cell's source (locked, and
checked against nbgrader's database), grades that part of the submission's modules with the autograder CLI in a fresh
process of the instructor's environment (jail on, SLM_TARGET ignored), and replaces the cell's outputs with that
verdict: the table, with hidden tests counted but never named, and the points as the cell's value.

While nbgrader executes the notebook, SLM_NBGRADER_AUTOGRADE=1 tells `grade_part` inside the kernel to skip its own
(untrusted, and now redundant) grading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

from autograder.notebook import graded_cell_call
from autograder.runner import KIT_ROOT, STATUS

AUTOGRADE_FLAG = "SLM_NBGRADER_AUTOGRADE"


class TrustedGrades(Preprocessor):
    """Replace each graded cell's outputs with the autograder's verdict on the submission's modules."""

    enabled = Bool(True, help="nbconvert preprocessors are off unless enabled; this one must always run")

    def preprocess(self, nb, resources):
        folder = Path(resources.get("metadata", {}).get("path") or ".").resolve()
        for cell in nb.cells:
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if cell.cell_type != "code" or not meta.get("grade") or meta.get("solution"):
                continue
            call = graded_cell_call(cell.source)
            if call is None:
                continue
            lab, tests = call
            text, earned = grade_cell(folder, lab, tests, float(meta.get("points", 0)))
            cell.outputs = [
                nbformat.v4.new_output("stream", name="stdout", text=text),
                nbformat.v4.new_output("execute_result", data={"text/plain": repr(earned)},
                                       execution_count=cell.get("execution_count")),
            ]
        return nb, resources


def grade_cell(folder: Path, lab: str, tests: list[str], points: float) -> tuple[str, float]:
    """Grade `tests` of `lab` in the submission that `folder` (the notebook's folder, the lab package) belongs to."""
    target = folder.parent if folder.name == lab else folder
    with tempfile.TemporaryDirectory(prefix="trusted-grade-") as scratch:
        results = Path(scratch) / "results.json"
        env = {key: value for key, value in os.environ.items() if not key.startswith("SLM_")}
        command = [sys.executable, "-m", "autograder", "grade", lab, "--target", str(target), "--tests", *tests,
                   "--json", str(results), "--progress", "off"]
        proc = subprocess.run(command, cwd=KIT_ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not results.exists():
            return f"The grader could not grade this part:\n{proc.stderr[-2000:]}", 0.0
        report = json.loads(results.read_text())
    return feedback(report, lab, tests), _earned(report, points)


def _earned(report: dict, points: float) -> float:
    if not report["max_score"]:
        return 0.0
    return round(points * report["score"] / report["max_score"], 3)


def feedback(report: dict, lab: str, tests: list[str]) -> str:
    """What the student sees: each public test with its result, the hidden tests only as a count."""
    lines = [f"{lab}: {', '.join(tests)}   {report['score']:.4g} / {report['max_score']:.4g}", ""]
    public = [t for t in report["tests"] if t.get("visibility") != "after_published"]
    hidden = [t for t in report["tests"] if t.get("visibility") == "after_published"]
    for test in public:
        outcome = "passed" if test["score"] == test["max_score"] and test["max_score"] > 0 else (
            "not_graded" if test["max_score"] == 0 else "failed")
        lines.append(f"  {STATUS[outcome]:<15} {test['score']:>5.3g}/{test['max_score']:<5.3g} "
                     f"{test['name'].split(': ', 2)[-1]}")
    if hidden:
        passed = sum(t["score"] == t["max_score"] for t in hidden)
        lines.append(f"  hidden tests: {passed} of {len(hidden)} passed, "
                     f"{sum(t['score'] for t in hidden):.3g} / {sum(t['max_score'] for t in hidden):.3g} points")
    failed = [t for t in public if t["score"] < t["max_score"]]
    if failed:
        lines += ["", "Failures", "--------"]
        for test in failed:
            lines += [test["name"].split(": ", 2)[-1], "    " + "\n    ".join(test["output"][:1500].splitlines()), ""]
    return "\n".join(lines) + "\n"
