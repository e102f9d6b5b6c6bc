"""The release tool: stubs from the reference, the student release, and the nbgrader course.

One source of truth (DESIGN.md): reference/labNN_*/*.py is the complete implementation, with the parts students write
between `# BEGIN SOLUTION` and `# END SOLUTION`. `make_stub` keeps everything else (imports, signatures, docstrings,
setup lines, hints in comments) and replaces each fenced region with

    # TODO (lab01): your code here
    raise NotImplementedError("lab01: CheckpointFunction.forward is not implemented yet (lab01_memory/checkpoint.py)")

at the region's indentation. The stubs are checked in under labs/; `sync_stubs(check=True)` (and a test) fail when they
drift from the reference.

The student release holds labs/ (the stubs and the shared code, labs/common), the public tests (no `hidden/` folders),
the slides, pyproject.toml and environment.yml, and is scanned for solution markers before it is returned. With
`nbgrader=True` it also holds an nbgrader course: source/<lab>/ (notebook + stubs), nbgrader_config.py, and the
release/ that `nbgrader generate_assignment` makes from it.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from autograder.runner import AUTOGRADER_DIR, KIT_ROOT, LAB_PATTERN

REFERENCE_DIR = KIT_ROOT / "reference"
LABS_DIR = KIT_ROOT / "labs"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
INSTRUCTOR_ONLY = ("mutate.py",)  # tools that work on reference/, which the release does not hold
MARKER = re.compile(r"^(\s*)# (BEGIN|END) SOLUTION\s*$")


# -----------------------------------------------------------------------------
# Stubs


def make_stub(source: str, *, lab: str, relpath: str) -> str:
    """The student version of one reference file: each solution region becomes a NotImplementedError."""
    lines = source.splitlines(keepends=True)
    owners = _enclosing_functions(source)
    lab_short = lab.split("_")[0]
    out, region_start = [], None
    for number, line in enumerate(lines, start=1):
        match = MARKER.match(line)
        if match and match.group(2) == "BEGIN":
            if region_start is not None:
                raise ValueError(f"{relpath}:{number}: nested {BEGIN}")
            region_start, indent = number, match.group(1)
            continue
        if match and match.group(2) == "END":
            if region_start is None:
                raise ValueError(f"{relpath}:{number}: {END} without {BEGIN}")
            owner = owners.get(region_start, "this function")
            out.append(f"{indent}# TODO ({lab_short}): your code here\n")
            out.append(f'{indent}raise NotImplementedError("{lab_short}: {owner} is not implemented yet ({relpath})")\n')
            region_start = None
            continue
        if region_start is None:
            out.append(line)
    if region_start is not None:
        raise ValueError(f"{relpath}:{region_start}: {BEGIN} is never closed")
    return "".join(out)


def _enclosing_functions(source: str) -> dict[int, str]:
    """line number -> qualified name of the innermost function containing it (Class.method or function)."""
    owners: dict[int, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    for line in range(child.lineno, (child.end_lineno or child.lineno) + 1):
                        owners[line] = name
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return owners


def reference_labs() -> list[Path]:
    return sorted(p for p in REFERENCE_DIR.iterdir() if p.is_dir() and LAB_PATTERN.match(p.name))


def expected_stubs() -> dict[Path, str]:
    """Every stub file labs/ should hold, keyed by its path under labs/."""
    stubs = {}
    for lab_dir in reference_labs():
        for path in sorted(lab_dir.rglob("*.py")):
            relpath = path.relative_to(REFERENCE_DIR).as_posix()
            stubs[Path(relpath)] = make_stub(path.read_text(), lab=lab_dir.name, relpath=relpath)
    return stubs


def sync_stubs(*, check: bool = False, labs_dir: Path = LABS_DIR) -> list[str]:
    """Write (or, with check, only compare) labs/ from reference/; returns the files that differed.

    Python files under labs/<lab>/ that have no reference counterpart are reported too (stale stubs).
    """
    expected = expected_stubs()
    changed = []
    for relpath, text in expected.items():
        target = labs_dir / relpath
        if not target.exists() or target.read_text() != text:
            changed.append(relpath.as_posix())
            if not check:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    for lab_dir in reference_labs():
        for path in sorted((labs_dir / lab_dir.name).rglob("*.py")):
            relpath = path.relative_to(labs_dir)
            if relpath not in expected:
                changed.append(f"{relpath.as_posix()} (no reference file)")
                if not check:
                    path.unlink()
    return changed


def solution_lines() -> set[str]:
    """The distinctive lines inside solution regions (for leak checks): stripped, at least 25 characters long, and
    not also present outside them (a line the stubs, the shared code or the grader hold anyway is no secret)."""
    public_texts = list(expected_stubs().values())
    public_texts += [p.read_text() for p in (LABS_DIR / "common").rglob("*.py")]
    public_texts += [p.read_text() for p in AUTOGRADER_DIR.glob("*.py")]
    public = {line.strip() for text in public_texts for line in text.splitlines()}
    found = set()
    for lab_dir in reference_labs():
        for path in lab_dir.rglob("*.py"):
            inside = False
            for line in path.read_text().splitlines():
                match = MARKER.match(line)
                if match:
                    inside = match.group(2) == "BEGIN"
                elif inside and len(line.strip()) >= 25 and not line.strip().startswith("#"):
                    found.add(line.strip())
    return found - public


# -----------------------------------------------------------------------------
# Student release


RELEASE_README = """# Systems for Large Models: student release

Set up once (CPU laptop; see environment.yml for a conda/GPU setup):

    python -m venv .venv && . .venv/bin/activate
    pip install torch==2.13.0 -e ".[dev]"

Then open a lab, fill in the functions that raise NotImplementedError, and check your work:

    jupyter lab labs/lab01_memory/lab01_memory.ipynb
    python -m autograder grade 01 --target labs        # the public tests, with points
    python -m autograder doctor                        # what this machine can grade

The slides under slides/ run against your own code in this release (SLM_TARGET=labs).
"""


def write_release(out: str | Path, *, nbgrader: bool = False, labs: list[str] | None = None) -> Path:
    """Write the student release to `out` (which must not exist) and verify it holds no solution text.

    Args:
        out: the directory to create.
        nbgrader: also write an nbgrader course under out/nbgrader.
        labs: release only these lab folders (e.g. week by week); default every lab.
    """
    out = Path(out).resolve()
    if out.exists():
        raise FileExistsError(f"release directory {out} already exists")
    labs = labs or [p.name for p in reference_labs()]
    stale = [f for f in sync_stubs(check=True) if f.split("/")[0] in labs]
    if stale:
        raise RuntimeError(f"labs/ is out of date with reference/ ({', '.join(stale)}): run `python -m autograder stubs`")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "hidden")
    for lab in labs:
        shutil.copytree(LABS_DIR / lab, out / "labs" / lab, ignore=ignore)
        shutil.copytree(AUTOGRADER_DIR / lab, out / "autograder" / lab, ignore=ignore)
        deck = KIT_ROOT / "slides" / f"{lab}.ipynb"
        if deck.exists():
            (out / "slides").mkdir(exist_ok=True)
            shutil.copy2(deck, out / "slides" / deck.name)
    for path in AUTOGRADER_DIR.glob("*.py"):  # the grader itself, without any lab's tests
        if path.name not in INSTRUCTOR_ONLY:
            shutil.copy2(path, out / "autograder" / path.name)
    shutil.copytree(LABS_DIR / "common", out / "labs" / "common", ignore=ignore)
    for name in ("pyproject.toml", "environment.yml", ".gitignore"):
        shutil.copy2(KIT_ROOT / name, out / name)
    (out / "README.md").write_text(RELEASE_README)
    if nbgrader:
        write_nbgrader_course(out / "nbgrader", labs=labs)
    check_release(out)
    return out


def check_release(out: Path) -> None:
    """Raise if the release holds a solution marker, a line of solution code, a hidden test or a reference lab."""
    secrets = solution_lines()
    for path in out.rglob("*"):
        if path.is_dir():
            if path.name in ("hidden", "reference"):
                raise RuntimeError(f"release leaks {path.relative_to(out)}")
            continue
        if path.suffix not in (".py", ".ipynb", ".md", ".toml", ".yml"):
            continue
        text = path.read_text(errors="replace")
        if path.name != "release.py" and (BEGIN in text or END in text):
            raise RuntimeError(f"release leaks a solution marker in {path.relative_to(out)}")
        for line in secrets:
            if line in text:
                raise RuntimeError(f"release leaks solution code in {path.relative_to(out)}: {line!r}")


# -----------------------------------------------------------------------------
# nbgrader course


def write_nbgrader_course(course: Path, *, labs: list[str]) -> Path:
    """source/<lab>/ (notebook and stubs) for each lab, the course config, and release/ made by nbgrader itself."""
    course.mkdir(parents=True)
    shutil.copy2(AUTOGRADER_DIR / "nbgrader_config.py", course / "nbgrader_config.py")
    for lab_dir in (LABS_DIR / lab for lab in labs):
        source = course / "source" / lab_dir.name
        # the assignment folder *is* the lab package: a submission imports lab01_memory.checkpoint from it
        shutil.copytree(lab_dir, source, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        run_nbgrader(course, "generate_assignment", lab_dir.name, "--force")
    return course


def nbgrader_env() -> dict[str, str]:
    """The environment nbgrader needs: it runs `alembic` from PATH, so this interpreter's bin/ goes first."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("SLM_TARGET", None)  # each notebook grades the submission it sits in
    return env


def run_nbgrader(course: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run an nbgrader command in `course`; raise with its output if it fails."""
    command = [sys.executable, "-m", "nbgrader", *args]
    result = subprocess.run(command, cwd=course, capture_output=True, text=True, timeout=timeout, env=nbgrader_env())
    if result.returncode:
        raise RuntimeError(f"`nbgrader {' '.join(args)}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
