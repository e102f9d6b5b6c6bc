"""The nbgrader flow, for real: generate the assignment, autograde two submissions, read the gradebook.

The stubs score zero; a submission with the reference code scores every autograded point, even though its modules
write warnings to stderr when imported (nbgrader zeroes a cell with stderr output, so the grade cells must not)."""

import shutil
import subprocess
import sys

import pytest

from autograder import release
from kit_helpers import KIT_ROOT

LAB = "lab01_memory"


def test_nbgrader_generate_and_autograde(tmp_path):
    course = release.write_release(tmp_path / "release", nbgrader=True, labs=[LAB]) / "nbgrader"
    assert (course / "release" / LAB / f"{LAB}.ipynb").exists(), "nbgrader generate_assignment made no release"
    assert (course / "release" / LAB / "checkpoint.py").exists()

    for student in ("stub_student", "reference_student"):
        shutil.copytree(course / "release" / LAB, course / "submitted" / student / LAB)
    submitted = course / "submitted" / "reference_student" / LAB
    for path in (KIT_ROOT / "reference" / LAB).glob("*.py"):
        text = path.read_text()
        if path.name == "checkpoint.py":
            noise = "import sys, warnings\nprint('debug noise', file=sys.stderr)\nwarnings.warn('a student warning')\n"
            text = text.replace("from __future__ import annotations\n", "from __future__ import annotations\n" + noise)
        (submitted / path.name).write_text(text)

    result = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", LAB, "--create", "--force"],
                            cwd=course, env=release.nbgrader_env(), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {}
        for student in ("stub_student", "reference_student"):
            notebook = gradebook.find_submission_notebook(LAB, LAB, student)
            # the locked code cells are autograded; the written answers (markdown) wait for a human
            auto = [g for g in notebook.grades if g.cell.cell_type == "code"]
            assert all(g.auto_score is not None for g in auto)
            assert auto, f"{student}: no autograded cells"
            scores[student] = (sum(g.auto_score for g in auto), sum(g.max_score for g in auto))
    stub_score, stub_max = scores["stub_student"]
    ref_score, ref_max = scores["reference_student"]
    assert stub_max == ref_max == 39
    assert stub_score == 0, f"the stubs scored {stub_score}"
    assert ref_score == ref_max, f"the reference scored {ref_score} of {ref_max}:\n{result.stdout[-2000:]}"
