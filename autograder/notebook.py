"""What a lab notebook's locked test cells call, and helpers to write lab notebooks with nbgrader metadata.

In a notebook:

    from autograder.notebook import grade_part
    grade_part("lab01_memory", ["test_checkpoint.py"], points=12)

runs those test files of the lab in a subprocess (the student's code cannot hang or kill the kernel), prints the
scorecard, and returns `points * earned / possible` as the cell's value. nbgrader reads that value as the cell's partial
credit. The cell writes nothing to stderr (nbgrader zeroes a cell with stderr output), so warnings cannot cost marks.

What is graded: $SLM_TARGET when set (CI runs the notebooks against the reference); otherwise the folder that holds
the notebook's lab package, which is labs/ in a checkout and the student's submission folder under nbgrader.

Authoring: `lab_notebook(cells)` with `markdown`, `code`, `graded_cell` and `answer_cell` builds an .ipynb whose
graded and written-answer cells carry nbgrader's metadata (locked grade cells, manually graded answers).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path


# -----------------------------------------------------------------------------
# Grading from a notebook cell


def grade_part(lab: str, tests: list[str], *, points: float) -> float:
    """Grade `tests` (file names under autograder/<lab>/) and return this cell's share of `points`."""
    from autograder import runner

    from common.target import default_target

    target = default_target()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        card = runner.grade([lab], target, tests=tests)
    print(card.table())
    if stderr.getvalue().strip():
        print("(messages from the grader)\n" + stderr.getvalue())
    if card.max_score == 0:
        print("No test of this part could be graded on this machine.")
        return 0.0
    return round(points * card.score / card.max_score, 3)


# -----------------------------------------------------------------------------
# Writing lab notebooks


def markdown(text: str) -> dict:
    import nbformat

    return nbformat.v4.new_markdown_cell(text.strip())


def code(source: str) -> dict:
    import nbformat

    return nbformat.v4.new_code_cell(source.strip())


def graded_cell(cell_id: str, lab: str, tests: list[str], points: float) -> dict:
    """A locked autograder-test cell worth `points`, graded by the lab's test files."""
    cell = code(
        "# Graded: runs the autograder on your code for this part (do not edit this cell).\n"
        "from autograder.notebook import grade_part\n"
        f"grade_part({lab!r}, {tests!r}, points={points})"
    )
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "task": False,
                                 "points": points, "grade_id": cell_id, "schema_version": 3}
    return cell


def answer_cell(cell_id: str, points: float, prompt: str = "YOUR ANSWER HERE") -> dict:
    """A manually graded markdown cell for a written question."""
    cell = markdown(prompt)
    cell.metadata["nbgrader"] = {"grade": True, "solution": True, "locked": False, "task": False,
                                 "points": points, "grade_id": cell_id, "schema_version": 3}
    return cell


def lab_notebook(cells: list[dict], path: str | os.PathLike) -> None:
    """Write the cells as a notebook with a Python 3 kernel."""
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.write(notebook, str(path))
