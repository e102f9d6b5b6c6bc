"""Every lab notebook and lecture deck executes end to end against the reference on CPU; decks render offline.

The notebooks' graded cells run in "check" mode here (SLM_NOTEBOOK_CHECK=1): each one must name real test files and
carry the points those tests add up to, and the grading itself is left to tests/test_grading.py, which grades every
part of every lab once against the reference (a full mark there is a full mark in the cell). One notebook (lab 01) is
also executed with its graded cells really grading, so `grade_part` inside a kernel stays tested end to end, as is
nbgrader's flow in tests/test_nbgrader.py.
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from kit_helpers import KIT_ROOT

NOTEBOOKS = sorted((KIT_ROOT / "labs").glob("lab*/lab*.ipynb"))
DECKS = sorted((KIT_ROOT / "slides").glob("lab*.ipynb"))


def _execute(path: Path, timeout: int = 900, *, check_only: bool = True) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    os.environ["SLM_TARGET"] = "reference"  # the kernel inherits it: notebooks run the reference here
    if check_only:
        os.environ["SLM_NOTEBOOK_CHECK"] = "1"
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        os.environ.pop("SLM_TARGET", None)
        os.environ.pop("SLM_NOTEBOOK_CHECK", None)
    return notebook


def _errors(notebook) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for c in notebook.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]


def _graded_cells(notebook) -> list:
    return [c for c in notebook.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")
            and c.cell_type == "code"]


def _check_common(path: Path, notebook) -> None:
    assert not _errors(notebook), _errors(notebook)
    assert _graded_cells(notebook), f"{path.name} has no graded cells"
    for cell in _graded_cells(notebook):
        stderr = [o for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, f"graded cell wrote to stderr (nbgrader would give it zero): {stderr}"
    plots = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert plots, f"{path.name} plots nothing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.parent.name)
def test_lab_notebook_runs_and_its_graded_cells_are_wired(path):
    from autograder.notebook import graded_cell_call
    from autograder.points import part_points

    notebook = _execute(path)
    _check_common(path, notebook)
    lab = path.parent.name
    parts = set()
    for cell in _graded_cells(notebook):
        called_lab, tests = graded_cell_call(cell.source)
        assert called_lab == lab, f"{cell.metadata.nbgrader.grade_id} grades {called_lab}, not {lab}"
        assert cell.metadata.nbgrader.points == sum(part_points(lab, t).total for t in tests), (
            f"{cell.metadata.nbgrader.grade_id}: its points are not those of its tests")
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert "SLM_NOTEBOOK_CHECK" in text, f"{cell.metadata.nbgrader.grade_id} did not run its grade_part call"
        parts.update(tests)
    cpu_parts = {p.name for p in (KIT_ROOT / "autograder" / lab).glob("test_*.py") if p.name != "test_gpu.py"}
    assert parts == cpu_parts, f"{lab}: parts without a graded cell: {sorted(cpu_parts - parts)}"


def test_a_notebook_really_grades_the_reference_to_full_marks():
    """End to end once: lab 01's graded cells grade the reference inside the kernel and return their full points."""
    path = KIT_ROOT / "labs" / "lab01_memory" / "lab01_memory.ipynb"
    notebook = _execute(path, check_only=False)
    _check_common(path, notebook)
    for cell in _graded_cells(notebook):
        points = cell.metadata.nbgrader.points
        results = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert results, f"graded cell {cell.metadata.nbgrader.grade_id} returned no score"
        assert float(results[0].data["text/plain"]) == points, (
            f"{cell.metadata.nbgrader.grade_id}: reference scored {results[0].data['text/plain']} of {points}")


@pytest.mark.parametrize("path", DECKS, ids=lambda p: p.stem)
def test_deck_renders_offline_and_fits_1280x720(path, tmp_path):
    """The deck executes against the reference, renders with reveal.js and MathML from local copies (no CDN), and
    no slide overflows 1280x720 in headless Chromium."""
    from autograder import decks

    html = decks.render_deck(path, tmp_path, target="reference")
    text = html.read_text()
    assert 'class="ename"' not in text and "Traceback" not in text, "a deck cell raised against the reference"
    report = decks.check_in_browser(html, screenshot=tmp_path / f"{path.stem}.png")
    assert not report["external"], f"the deck loads from the internet: {report['external']}"
    assert report["slides"] >= 3
    assert not report["overflow"], "slides overflow 1280x720:\n" + "\n".join(
        f"  slide {p['slide']} ({p['title'][:40]}): {p['what']} ({p['px']} px, room {p['max']} px)"
        for p in report["overflow"])
    assert "$" not in "".join(line for line in text.splitlines() if "<math" in line), "TeX left unrendered"


@pytest.mark.parametrize("path", DECKS, ids=lambda p: p.stem)
def test_deck_renders_on_the_stubs(path, tmp_path):
    """In the student release a deck runs on the stubs: a slide shows the stub's NotImplementedError, the render
    goes on."""
    from autograder import decks

    html = decks.render_deck(path, tmp_path, target="labs").read_text()
    assert "reveal" in html and len(html) > 10_000
    assert "NotImplementedError" in html, "no slide calls the lab's code: what does the deck demonstrate?"
