"""One source of truth: the stubs are generated from the reference, leak nothing, and the release is clean."""

import ast
import re
import shutil
from pathlib import Path

import pytest

from autograder import release
from autograder.runner import AUTOGRADER_DIR, discover_labs
from kit_helpers import KIT_ROOT, run_cli

LABS = [p.name for p in release.reference_labs()]


def test_there_are_labs():
    assert "lab01_memory" in LABS


def test_stubs_are_in_sync_with_the_reference():
    changed = release.sync_stubs(check=True)
    assert not changed, f"labs/ differs from what reference/ generates; run `python -m autograder stubs`: {changed}"


def test_no_solution_text_reaches_labs():
    secrets = release.solution_lines()
    assert secrets, "no solution lines found: the leak check would be vacuous"
    for path in (KIT_ROOT / "labs").rglob("*"):
        if path.suffix not in (".py", ".ipynb", ".md"):
            continue
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text, f"solution marker in {path}"
        leaked = [line for line in secrets if line in text]
        assert not leaked, f"{path} contains solution code: {leaked[:3]}"


@pytest.mark.parametrize("lab", LABS)
def test_every_stub_raises_a_helpful_not_implemented_error(lab):
    short = lab.split("_")[0]
    raises = 0
    for path in (KIT_ROOT / "labs" / lab).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                    getattr(node.exc.func, "id", "") == "NotImplementedError":
                raises += 1
                message = node.exc.args[0].value
                assert re.fullmatch(rf"{short}: [\w.]+ is not implemented yet \({lab}/[\w/]+\.py\)", message), message
    assert raises > 0, f"{lab}: the stubs contain no NotImplementedError: nothing for students to write"


def test_make_stub_keeps_signature_docstring_and_setup():
    source = '''def f(x: int) -> int:
    """Doc."""
    y = x + 1  # setup stays
    # BEGIN SOLUTION
    return y * 2
    # END SOLUTION
'''
    stub = release.make_stub(source, lab="lab99_demo", relpath="lab99_demo/demo.py")
    assert 'def f(x: int) -> int:\n    """Doc."""\n    y = x + 1  # setup stays\n' in stub
    assert 'raise NotImplementedError("lab99: f is not implemented yet (lab99_demo/demo.py)")' in stub
    assert "return y * 2" not in stub
    with pytest.raises(ValueError, match="never closed"):
        release.make_stub("def f():\n    # BEGIN SOLUTION\n    pass\n", lab="lab99_demo", relpath="x.py")


@pytest.mark.parametrize("lab", LABS)
def test_lab_has_every_piece(lab):
    """The anatomy of a lab: reference, stubs, notebook, README, graded tests, slides, benchmark."""
    for path in [KIT_ROOT / "labs" / lab / f"{lab}.ipynb", KIT_ROOT / "labs" / lab / "README.md",
                 KIT_ROOT / "slides" / f"{lab}.ipynb", KIT_ROOT / "reference" / lab / "benchmark.py"]:
        assert path.exists(), f"{lab}: missing {path.relative_to(KIT_ROOT)}"
    assert lab in discover_labs(), f"{lab}: no graded tests under autograder/{lab}/"


def _test_functions():
    for path in AUTOGRADER_DIR.glob("lab*/**/test_*.py"):
        tree = ast.parse(path.read_text())
        yield path, tree


def _fixtures_on_student(test_file) -> set[str]:
    """Fixtures of the lab's conftest.py that take `student` themselves (lab 03's shared_run caches student.run)."""
    conftest = test_file.parent / "conftest.py"
    if not conftest.exists():
        conftest = test_file.parent.parent / "conftest.py"  # hidden/ tests use the lab's conftest
    if not conftest.exists():
        return set()
    return {node.name for node in ast.parse(conftest.read_text()).body
            if isinstance(node, ast.FunctionDef) and "student" in [a.arg for a in node.args.args]}


def test_every_graded_test_has_points_and_runs_student_code_only_in_the_worker():
    """Every test has points and takes the `student` fixture; no test module imports a lab at module level (the
    grading process refuses lab imports at run time too, and the worker refuses them in producer modules)."""
    found = 0
    for path, tree in _test_functions():
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(re.match(r"lab\d\d", n) for n in names), (
                    f"{path.name}: module-level import of {names}: import the lab inside a producer function")
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found += 1
                marks = [ast.unparse(d) for d in node.decorator_list]
                assert any(m.startswith("pytest.mark.points(") for m in marks), f"{path.name}::{node.name} has no points"
                args = [a.arg for a in node.args.args]
                assert "student" in args or set(args) & _fixtures_on_student(path), (
                    f"{path.name}::{node.name} does not take the `student` fixture (or a conftest fixture built on "
                    "it): how does it run the submission?")
    assert found > 10


def test_release_refuses_to_overwrite_and_to_hold_the_course(tmp_path):
    """An existing folder, an nbgrader course inside the release: one-line errors, nothing written."""
    (tmp_path / "exists").mkdir()
    proc = run_cli("release", str(tmp_path / "exists"), "--labs", "01")
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("release", str(tmp_path / "r"), "--nbgrader", str(tmp_path / "r" / "course"), "--labs", "01")
    assert proc.returncode == 2 and "outside the student release" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_stubs_refuse_to_overwrite_edits(tmp_path):
    """`stubs` keeps a student's (or an author's) uncommitted edits unless --force."""
    target = tmp_path / "labs"
    shutil.copytree(KIT_ROOT / "labs", target, ignore=shutil.ignore_patterns("*.ipynb", "__pycache__"))
    edited = target / "lab01_memory" / "plans.py"
    edited.write_text(edited.read_text() + "\n# my work in progress\n")
    with pytest.raises(release.ReleaseError, match="lab01_memory/plans.py"):
        release.sync_stubs(labs_dir=target)
    assert "# my work in progress" in edited.read_text()
    release.sync_stubs(labs_dir=target, force=True)
    assert "# my work in progress" not in edited.read_text()


def test_release_readme_is_complete_and_points_come_from_the_tests(tmp_path):
    from autograder.points import lab_parts

    out = release.write_release(tmp_path / "release", labs=["lab01_memory"])
    text = (out / "README.md").read_text()
    for needed in ("download.pytorch.org/whl/cpu", "macOS", "Windows", "python -m autograder grade 01",
                   "not graded here", "Submit"):
        assert needed in text, f"the student README does not say {needed!r}"
    public = sum(p.public for p in lab_parts("lab01_memory").values())
    assert f"| `lab01_memory` | {public:g} |" in text
    assert "reference" not in text.split("## The labs")[0].lower().replace("references", "")


def test_release_contains_no_solutions_or_hidden_tests(tmp_path):
    out = release.write_release(tmp_path / "release")
    assert (out / "labs" / "lab01_memory" / "checkpoint.py").exists()
    assert (out / "labs" / "common" / "model.py").exists()
    assert not list(out.rglob("hidden")), "hidden tests were released"
    assert not (out / "reference").exists(), "reference solutions were released"
    assert (out / "autograder" / "lab01_memory" / "test_checkpoint.py").exists()
    # the checker itself must fail on a leak
    (out / "labs" / "lab01_memory" / "leak.py").write_text("# BEGIN SOLUTION\n")
    with pytest.raises(RuntimeError, match="solution marker"):
        release.check_release(out)
