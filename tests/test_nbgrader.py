"""The nbgrader flow, for real: generate the assignment, autograde submissions, read the gradebook.

- the stubs score zero, the reference scores every autograded point (even with modules that write to stderr);
- a submission whose notebook tries to cheat in the kernel (SLM_TARGET=reference before the locked cells, a
  replaced `grade_part`) still scores zero: the grades come from the course's TrustedGrades step, outside the kernel;
- feedback never names a hidden test, and the student release holds no gradebook.db.
"""

import json
import shutil
import subprocess
import sys

import nbformat
import pytest

from autograder import release
from autograder.points import part_points
from kit_helpers import KIT_ROOT

LAB = "lab01_memory"

CHEAT_CELL = """
import os
os.environ["SLM_TARGET"] = "reference"
os.environ.pop("SLM_NBGRADER_AUTOGRADE", None)
import autograder.notebook
autograder.notebook.grade_part = lambda lab, tests, **kwargs: 1000.0
"""


def _submit(course, student: str, *, reference: bool, cheat: bool = False) -> None:
    submitted = course / "submitted" / student / LAB
    shutil.copytree(course / "release" / LAB, submitted)
    if reference:
        for path in (KIT_ROOT / "reference" / LAB).glob("*.py"):
            text = path.read_text()
            if path.name == "checkpoint.py":
                noise = "import sys, warnings\nprint('debug noise', file=sys.stderr)\nwarnings.warn('a student warning')\n"
                text = text.replace("from __future__ import annotations\n", "from __future__ import annotations\n" + noise)
            (submitted / path.name).write_text(text)
    if cheat:
        notebook = nbformat.read(submitted / f"{LAB}.ipynb", as_version=4)
        notebook.cells.insert(1, nbformat.v4.new_code_cell(CHEAT_CELL))
        nbformat.write(notebook, submitted / f"{LAB}.ipynb")


@pytest.fixture(scope="module")
def graded_course(tmp_path_factory):
    root = tmp_path_factory.mktemp("nbgrader")
    out = release.write_release(root / "release", labs=[LAB])
    assert not list(out.rglob("*.db")), "the student release holds a database"
    course = release.write_nbgrader_course(root / "course", labs=[LAB])
    assert (course / "release" / LAB / f"{LAB}.ipynb").exists(), "nbgrader generate_assignment made no release"
    assert (course / "release" / LAB / "checkpoint.py").exists()
    _submit(course, "stub_student", reference=False)
    _submit(course, "reference_student", reference=True)
    _submit(course, "cheating_student", reference=False, cheat=True)
    result = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", LAB, "--create", "--force"],
                            cwd=course, env=release.nbgrader_env(), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return course, result


def _scores(course) -> dict:
    from nbgrader.api import Gradebook

    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        for student in ("stub_student", "reference_student", "cheating_student"):
            notebook = gradebook.find_submission_notebook(LAB, LAB, student)
            # the locked code cells are autograded; the written answers (markdown) wait for a human
            auto = [g for g in notebook.grades if g.cell.cell_type == "code"]
            assert auto and all(g.auto_score is not None for g in auto), f"{student}: cells were not autograded"
            scores[student] = (sum(g.auto_score for g in auto), sum(g.max_score for g in auto))
    return scores


def test_stubs_zero_reference_full_cheat_zero(graded_course):
    course, result = graded_course
    scores = _scores(course)
    notebook = nbformat.read(KIT_ROOT / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    parts = [c for c in notebook.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")
             and c.cell_type == "code"]
    expected_max = sum(c.metadata.nbgrader.points for c in parts)
    assert scores["reference_student"] == (expected_max, expected_max), result.stdout[-2000:]
    assert scores["stub_student"] == (0, expected_max)
    assert scores["cheating_student"] == (0, expected_max), "a notebook cell changed the grade"


def test_graded_cell_points_come_from_the_tests():
    notebook = nbformat.read(KIT_ROOT / "labs" / LAB / f"{LAB}.ipynb", as_version=4)
    from autograder.notebook import graded_cell_call

    for cell in notebook.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade"):
            lab, tests = graded_cell_call(cell.source)
            assert meta["points"] == sum(part_points(lab, t).total for t in tests), meta["grade_id"]


def test_feedback_never_names_a_hidden_test(graded_course):
    course, _ = graded_course
    hidden_names = [line.split("def ")[1].split("(")[0]
                    for path in (KIT_ROOT / "autograder" / LAB / "hidden").glob("test_*.py")
                    for line in path.read_text().splitlines() if line.startswith("def test_")]
    assert hidden_names
    notebook = nbformat.read(course / "autograded" / "reference_student" / LAB / f"{LAB}.ipynb", as_version=4)
    text = json.dumps([c.get("outputs", []) for c in notebook.cells])
    assert "hidden tests:" in text
    for name in hidden_names:
        assert name not in text, f"the hidden test {name} appears in the feedback"
