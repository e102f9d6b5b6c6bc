"""The release tool: stubs from the reference, the student release, and the nbgrader course.

One source of truth (docs/design.md): reference/labNN_*/*.py is the complete implementation, with the parts students write
between `# BEGIN SOLUTION` and `# END SOLUTION`. `make_stub` keeps everything else (imports, signatures, docstrings,
setup lines, hints in comments) and replaces each fenced region with

    # TODO (lab01): your code here
    raise NotImplementedError("lab01: CheckpointFunction.forward is not implemented yet (lab01_memory/checkpoint.py)")

at the region's indentation. The stubs are checked in under labs/; `sync_stubs(check=True)` (and a test) fail when they
drift from the reference.

The student release holds labs/ (the stubs and the shared code, labs/common), the public tests (no `hidden/` folders),
the slides, the grader (without its instructor-only tools), pyproject.toml, environment.yml and its own README, and is
scanned for solution markers, solution lines, hidden tests and databases before it is returned. The nbgrader course
(source/<lab>/ with notebook and stubs, nbgrader_config.py, the release/ that `nbgrader generate_assignment` makes,
and nbgrader's gradebook.db) is written to a separate folder: it is the instructor's, never the students'.
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
class ReleaseError(RuntimeError):
    """A release or stub command refused to run (an existing folder, stale stubs, edits it would overwrite)."""


INSTRUCTOR_ONLY = ("mutate.py", "nbgrader_grading.py", "nbgrader_config.py")  # tools that work on reference/, which the release does not hold
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
        for path in sorted(lab_dir.glob("*.json")):  # a lab's data files (lab 10's profiles), copied as they are
            stubs[path.relative_to(REFERENCE_DIR)] = path.read_text()
    return stubs


STUB_MANIFEST = ".stubs-written.json"  # under labs/, git-ignored: what `stubs` wrote last, by content hash


def sync_stubs(*, check: bool = False, force: bool = False, labs_dir: Path = LABS_DIR) -> list[str]:
    """Write (or, with check, only compare) labs/ from reference/; returns the files that differed.

    Python files under labs/<lab>/ that have no reference counterpart are reported too (stale stubs). Writing refuses
    (ReleaseError, nothing written) when a stub holds edits that neither git has nor this command wrote last time:
    someone's work, e.g. a student who ran this in their own checkout. `force` overwrites them anyway.
    """
    import hashlib
    import json

    expected = expected_stubs()
    changed, stale = [], []
    for relpath, text in expected.items():
        target = labs_dir / relpath
        if not target.exists() or target.read_text() != text:
            changed.append(relpath)
    for lab_dir in reference_labs():
        for path in sorted((labs_dir / lab_dir.name).rglob("*.py")):
            relpath = path.relative_to(labs_dir)
            if relpath not in expected:
                stale.append(relpath)
    report = [r.as_posix() for r in changed] + [f"{r.as_posix()} (no reference file)" for r in stale]
    if check:
        return report
    manifest_path = labs_dir / STUB_MANIFEST
    written = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}

    def untouched(path: Path) -> bool:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return written.get(path.relative_to(labs_dir).as_posix()) == digest or _committed(path)

    edited = [r for r in changed + stale if (labs_dir / r).exists() and not untouched(labs_dir / r)]
    if edited and not force:
        raise ReleaseError("these stubs hold edits that git does not have and `stubs` did not write, so writing would "
                           "destroy them: " + ", ".join(r.as_posix() for r in edited)
                           + " (commit them, or pass --force to overwrite)")
    for relpath in changed:
        target = labs_dir / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(expected[relpath])
        written[relpath.as_posix()] = hashlib.sha256(target.read_bytes()).hexdigest()
    for relpath in stale:
        (labs_dir / relpath).unlink()
        written.pop(relpath.as_posix(), None)
    if changed or stale:
        manifest_path.write_text(json.dumps(written, indent=1, sort_keys=True))
    return report


def _committed(path: Path) -> bool:
    """Whether `path` holds exactly what git's HEAD has for it (False outside a git checkout, or if untracked)."""
    try:
        relative = path.resolve().relative_to(KIT_ROOT)
        head = subprocess.run(["git", "show", f"HEAD:{relative.as_posix()}"], cwd=KIT_ROOT, capture_output=True,
                              timeout=30)
    except (ValueError, OSError, subprocess.TimeoutExpired):
        return False
    return head.returncode == 0 and head.stdout == path.read_bytes()


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


def release_readme(labs: list[str]) -> str:
    """The student release's README: complete on its own (students never see the instructor's checkout)."""
    from autograder.points import lab_parts

    rows = []
    for lab in labs:
        parts = lab_parts(lab)
        public = sum(p.public for p in parts.values())
        hidden = sum(p.hidden for p in parts.values())
        names = ", ".join(f"{name[5:-3]} ({p.public:g})" for name, p in parts.items())
        rows.append(f"| `{lab}` | {public:g} | {hidden:g} | {names} |")
    table = "\n".join(rows)
    return STUDENT_README.replace("{LAB_TABLE}", table).replace("{FIRST}", labs[0] if labs else "lab01_memory")


STUDENT_README = """# Systems for Large Models: the labs

You build, one lab at a time, the techniques that let billion-parameter transformers be trained, fine-tuned and served
on modest hardware. Each lab is a folder under `labs/` with a notebook that explains and drives it, and Python modules
whose functions you fill in. Everything runs and is graded on a laptop CPU; a few measurements need a GPU and say so.

## Set up (once)

You need Python 3.10-3.12 and about 3 GB of disk.

Linux (a laptop without an NVIDIA GPU). PyPI's torch for Linux is the CUDA build, several GB of NVIDIA packages; take
the CPU build from PyTorch's own index first:

    python3 -m venv .venv && . .venv/bin/activate
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install -e ".[student]"

macOS (Apple silicon or Intel) and Windows: PyPI's torch is already the CPU build.

    python3 -m venv .venv && . .venv/bin/activate          # Windows: .venv\\Scripts\\activate
    pip install torch==2.13.0 -e ".[student]"

On Windows, use WSL 2 (Ubuntu) for the labs with several processes (03, 04, 05, 09, 10): they need Linux's process
model, and grading there runs your code in the same sandbox as your instructor's grader.

A GPU machine (Linux, NVIDIA): `pip install torch==2.13.0 -e ".[student]"` gives the CUDA build.

Triton (about 300 MB) is installed on every system, also without a GPU: on a CPU, Triton kernels run in its
interpreter (`TRITON_INTERPRET=1`, set for you), so the kernel labs (02, 07, 08, 09) work on a laptop.

## Work on a lab

    jupyter lab labs/{FIRST}/{FIRST}.ipynb

Read the notebook top to bottom. Each task names a function in the lab's modules that raises `NotImplementedError`;
write it, then run the notebook's graded cell for that part, or grade from a terminal:

    python -m autograder grade 01                          # every public test of lab 01, with points
    python -m autograder grade 01 --tests test_plans.py    # one part
    python -m autograder doctor                            # what this machine can grade

A failure names the function, the input it was given and how far off your result was. Your code runs in a separate
worker process (on Linux, inside a bubblewrap sandbox when one is available; elsewhere you see a one-line warning),
so a hang or a crash costs one test, not your session. Tests that need a GPU are reported "not graded here" on a
laptop: they count neither for nor against you. Grading one lab takes one to three minutes on a 2-core laptop.

## The labs and their points

The points below are those of the public tests you have. Your instructor also grades hidden tests: the same ideas on
inputs you do not see (the "hidden" column), so test your code beyond the public cases.

| lab | public points | hidden points | parts (public points) |
|---|---|---|---|
{LAB_TABLE}

## Submit

Zip the lab's folder as it sits in `labs/` (the modules and the notebook) and hand it in as your course says, or use
the course's nbgrader exchange. Only your lab's modules are graded; `labs/common/` is the course's shared code, and
the grader always uses its own copy of it.

## Slides

The lecture decks are in `slides/`; they run against your own code here:

    jupyter lab slides/{FIRST}.ipynb
"""


def write_release(out: str | Path, *, labs: list[str] | None = None) -> Path:
    """Write the student release to `out` (which must not exist) and verify it holds no solution text.

    Args:
        out: the directory to create.
        labs: release only these lab folders (e.g. week by week); default every lab.

    Raises:
        ReleaseError: `out` exists, or the stubs are out of date.
    """
    out = Path(out).resolve()
    if out.exists():
        raise ReleaseError(f"the release directory {out} already exists: choose a new one (or remove it first)")
    labs = labs or [p.name for p in reference_labs()]
    stale = [f for f in sync_stubs(check=True) if f.split("/")[0] in labs]
    if stale:
        raise ReleaseError(f"labs/ is out of date with reference/ ({', '.join(stale)}): run `python -m autograder stubs`")
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
    (out / "README.md").write_text(release_readme(labs))
    check_release(out)
    return out


def check_release(out: Path) -> None:
    """Raise if the release holds a solution marker, a line of solution code, a hidden test, a reference lab or a
    database (nbgrader's gradebook.db holds students' grades)."""
    secrets = solution_lines()
    for path in out.rglob("*"):
        if path.suffix in (".db", ".sqlite"):
            raise RuntimeError(f"release leaks a database: {path.relative_to(out)}")
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


def write_nbgrader_course(course: str | Path, *, labs: list[str] | None = None) -> Path:
    """source/<lab>/ (notebook and stubs) for each lab, the course config, and release/ made by nbgrader itself.

    The course folder is the instructor's (it holds nbgrader's gradebook.db); it must not exist yet."""
    course = Path(course).resolve()
    if course.exists():
        raise ReleaseError(f"the nbgrader course directory {course} already exists: choose a new one")
    labs = labs or [p.name for p in reference_labs()]
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
