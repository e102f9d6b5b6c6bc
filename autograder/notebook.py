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


def grade_part(lab: str, tests: list[str]) -> float:
    """Grade `tests` (file names under autograder/<lab>/, with their hidden tests where this kit has them) and return
    the points earned, out of the part's points as the tests define them (autograder/points.py).

    Runs the autograder in a subprocess: the student's code runs in its jailed worker, never in this kernel. Under
    nbgrader, the course's TrustedGrades preprocessor replaces this cell's output with a grading done outside the
    student's kernel (autograder/nbgrader_grading.py), so nothing the notebook did before this cell counts.
    """
    from autograder import runner
    from autograder.points import part_points

    from common.target import default_target

    if os.environ.get("SLM_NOTEBOOK_CHECK") == "1":
        # the kit's notebook test: it checks that this cell names real test files and the right points, and leaves
        # the grading itself to the kit's grading test, which grades every part of every lab once
        from autograder.points import part_points as _points

        total = sum(_points(lab, test).total for test in tests)  # raises on an unknown lab or test file
        print(f"SLM_NOTEBOOK_CHECK: {lab} {', '.join(tests)} ({total:g} points) is graded by tests/test_grading.py")
        return 0.0
    if os.environ.get("SLM_NBGRADER_AUTOGRADE") == "1":
        # nbgrader autograde: the course's TrustedGrades step grades this part outside the kernel and replaces
        # this cell's output; grading here too would only cost time
        print("Graded by the course's autograder outside this notebook.")
        return 0.0
    target = default_target()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        card = runner.grade([lab], target, runner.Options(tests=tuple(tests)))
    print(card.table())
    if stderr.getvalue().strip():
        print("(messages from the grader)\n" + stderr.getvalue())
    if card.max_score == 0:
        print("No test of this part could be graded on this machine.")
        return 0.0
    points = sum(part_points(lab, test).total for test in tests)
    hidden = sum(part_points(lab, test).hidden for test in tests)
    graded_hidden = any(r.hidden for r in card.results)
    if hidden and not graded_hidden:
        print(f"This part is worth {points:g} points: {points - hidden:g} from the public tests above, {hidden:g} from "
              "hidden tests your instructor grades after the deadline.")
        points -= hidden
    return round(points * card.score / card.max_score, 3)


# -----------------------------------------------------------------------------
# Writing lab notebooks


def markdown(text: str) -> dict:
    import nbformat

    return nbformat.v4.new_markdown_cell(text.strip())


def code(source: str) -> dict:
    import nbformat

    return nbformat.v4.new_code_cell(source.strip())


def graded_cell(cell_id: str, lab: str, tests: list[str]) -> dict:
    """A locked autograder-test cell, graded by the lab's test files and worth what their points add up to."""
    from autograder.points import part_points

    points = sum(part_points(lab, test).total for test in tests)
    cell = code(
        "# Graded: runs the autograder on your code for this part (do not edit this cell).\n"
        "from autograder.notebook import grade_part\n"
        f"grade_part({lab!r}, {tests!r})"
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


def graded_cell_call(source: str) -> tuple[str, list[str]] | None:
    """(lab, tests) of a graded cell's `grade_part(...)` call, read from its source without running it."""
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "grade_part" and len(node.args) >= 2:
            return ast.literal_eval(node.args[0]), list(ast.literal_eval(node.args[1]))
    return None


def refresh_graded_cells(path: str | os.PathLike) -> int:
    """Rewrite every graded cell of a notebook from its tests (the call and nbgrader's points); returns how many."""
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    count = 0
    for index, cell in enumerate(notebook.cells):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        call = graded_cell_call(cell.source) if cell.cell_type == "code" and meta.get("grade") else None
        if call is None:
            continue
        fresh = graded_cell(meta["grade_id"], call[0], call[1])
        fresh.outputs, fresh.execution_count = cell.get("outputs", []), cell.get("execution_count")
        notebook.cells[index] = fresh
        count += 1
    nbformat.write(notebook, str(path))
    return count


def lab_notebook(cells: list[dict], path: str | os.PathLike) -> None:
    """Write the cells as a notebook with a Python 3 kernel."""
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    nbformat.write(notebook, str(path))
