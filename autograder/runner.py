"""Grade one lab or all of them against a target, and turn the results into a scorecard, results.json and CSV.

Each lab runs as one pytest process (in its own session, with an overall time limit) using `autograder.plugin`, which
forks every graded test. This module never imports torch or student code, so it cannot be broken by either.

    card = grade(["lab01_memory"], target="reference")
    print(card.table())
    card.write_gradescope("results.json")
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.target import LAB_PATTERN, has_gpu_device
from common.target import resolve_target as resolve_target_dir

AUTOGRADER_DIR = Path(__file__).resolve().parent
KIT_ROOT = AUTOGRADER_DIR.parent
LAB_TIME_LIMIT_S = 900  # one lab's whole pytest run; each test has its own, much smaller, limit


class GraderError(RuntimeError):
    """The grader itself failed (not the submission): bad arguments, a broken test suite, a missing tool."""


# -----------------------------------------------------------------------------
# Labs and targets


def discover_labs() -> list[str]:
    """Lab folder names under autograder/, in lab order."""
    return sorted(p.name for p in AUTOGRADER_DIR.iterdir() if p.is_dir() and LAB_PATTERN.match(p.name))


def resolve_lab(name: str) -> str:
    """'01', '1', 'lab01' or 'lab01_memory' -> 'lab01_memory'."""
    labs = discover_labs()
    if name in labs:
        return name
    digits = re.sub(r"^lab", "", name)
    if digits.isdigit():
        for lab in labs:
            if int(LAB_PATTERN.match(lab).group(1)) == int(digits):
                return lab
    raise GraderError(f"unknown lab {name!r}; the labs are: {', '.join(labs)}")


def resolve_target(target: str) -> Path:
    """'labs', 'reference', a directory laid out like labs/, or a .zip of one."""
    if target.endswith(".zip") and Path(target).is_file():
        return _unzip_submission(Path(target).resolve())
    try:
        return resolve_target_dir(target)
    except FileNotFoundError:
        raise GraderError(f"target {target!r} is neither 'labs', 'reference', a directory nor a .zip") from None


def _unzip_submission(path: Path) -> Path:
    import zipfile

    out = Path(tempfile.mkdtemp(prefix="submission-"))
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.startswith("/") or ".." in Path(member).parts:
                raise GraderError(f"{path.name}: refusing the unsafe path {member!r}")
        archive.extractall(out)
    # accept both a zip of labs/ itself and a zip whose single top folder is labs/
    entries = [p for p in out.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if len(entries) == 1 and entries[0].is_dir() and not LAB_PATTERN.match(entries[0].name):
        return entries[0]
    return out


# -----------------------------------------------------------------------------
# Results


@dataclass
class TestResult:
    lab: str
    name: str
    file: str
    outcome: str  # passed | failed | not_graded
    score: float
    max_score: float
    message: str
    hidden: bool = False
    doc: str = ""
    duration_s: float = 0.0


@dataclass
class Scorecard:
    target: str
    results: list[TestResult] = field(default_factory=list)

    @property
    def graded(self) -> list[TestResult]:
        return [r for r in self.results if r.outcome != "not_graded"]

    @property
    def score(self) -> float:
        return round(sum(r.score for r in self.graded), 6)

    @property
    def max_score(self) -> float:
        return round(sum(r.max_score for r in self.graded), 6)

    def labs(self) -> list[str]:
        return list(dict.fromkeys(r.lab for r in self.results))

    def table(self, *, verbose: bool = True) -> str:
        """A plain-text scorecard: one row per test, a total per lab, then failure messages."""
        lines = [f"Target: {self.target}", ""]
        width = max([len(r.name) for r in self.results] + [20])
        for lab in self.labs():
            rows = [r for r in self.results if r.lab == lab]
            lab_score = sum(r.score for r in rows if r.outcome != "not_graded")
            lab_max = sum(r.max_score for r in rows if r.outcome != "not_graded")
            lines.append(f"{lab}  {lab_score:.4g} / {lab_max:.4g}")
            for r in rows:
                status = {"passed": "PASS", "failed": "FAIL", "not_graded": "NOT GRADED HERE"}[r.outcome]
                first = r.message.strip().splitlines()[0][:90] if r.message.strip() else ""
                lines.append(f"  {status:<15} {r.score:>5.3g}/{r.max_score:<5.3g} {r.name:<{width}} {first}")
            lines.append("")
        not_graded = [r for r in self.results if r.outcome == "not_graded"]
        lines.append(f"TOTAL  {self.score:.4g} / {self.max_score:.4g}"
                     + (f"   ({len(not_graded)} tests, {sum(r.max_score for r in not_graded):g} points, "
                        "not graded here: they need hardware this machine lacks)" if not_graded else ""))
        failures = [r for r in self.results if r.outcome == "failed"]
        if verbose and failures:
            lines += ["", "Failures", "--------"]
            for r in failures:
                lines += [f"[{r.lab}] {r.name} ({r.file})", _indent(r.message.strip()[:1500]), ""]
        return "\n".join(lines)

    def gradescope(self) -> dict:
        """Gradescope's results.json: top-level score and max_score, and one entry per test."""
        tests = []
        for r in self.results:
            entry = {
                "name": f"{r.lab}: {r.name}",
                "score": r.score,
                "max_score": r.max_score if r.outcome != "not_graded" else 0.0,
                "output": r.message if r.message else "passed",
                "visibility": "after_published" if r.hidden else "visible",
            }
            if r.outcome == "not_graded":
                entry["output"] = r.message + f" (worth {r.max_score:g} points where the hardware exists)"
            tests.append(entry)
        return {"score": self.score, "max_score": self.max_score, "tests": tests}

    def write_gradescope(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.gradescope(), indent=2))

    def write_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["lab", "test", "file", "outcome", "score", "max_score", "hidden", "message"])
            for r in self.results:
                first = r.message.strip().splitlines()[0] if r.message.strip() else ""
                writer.writerow([r.lab, r.name, r.file, r.outcome, r.score, r.max_score, r.hidden, first])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# -----------------------------------------------------------------------------
# Running pytest


def grade(labs: list[str], target: str, *, tests: list[str] | None = None, include_hidden: bool = True,
          time_limit_scale: float = 1.0) -> Scorecard:
    """Grade `labs` against `target`; `tests` restricts each lab to those test files (e.g. ["test_checkpoint.py"])."""
    target_dir = resolve_target(target)
    card = Scorecard(target=str(target_dir))
    for lab in labs:
        card.results += grade_lab(resolve_lab(lab), target_dir, tests=tests, include_hidden=include_hidden,
                                  time_limit_scale=time_limit_scale)
    return card


def grade_lab(lab: str, target_dir: Path, *, tests: list[str] | None = None, include_hidden: bool = True,
              time_limit_scale: float = 1.0) -> list[TestResult]:
    lab_dir = AUTOGRADER_DIR / lab
    paths = [lab_dir]
    if tests:
        # a part's hidden tests sit in hidden/<part stem>_hidden.py and are graded with it (when present)
        paths = [lab_dir / t for t in tests]
        for path in paths:
            if not path.exists():
                raise GraderError(f"{lab}: no test file {path.name}")
        if include_hidden:
            paths += [p for t in tests for p in sorted((lab_dir / "hidden").glob(f"{Path(t).stem}_hidden*.py"))]
    results_file = Path(tempfile.mkstemp(prefix=f"{lab}-", suffix=".json")[1])
    command = [
        sys.executable, "-m", "pytest", *map(str, paths),
        "-p", "autograder.plugin", "--target", str(target_dir), "--results", str(results_file),
        "--time-limit-scale", str(time_limit_scale),
        "-q", "--no-header", "--tb=short", "--import-mode=importlib", "-p", "no:cacheprovider", "--rootdir", str(KIT_ROOT), "-o", "addopts=",
    ]
    if not include_hidden:
        command += ["--ignore", str(lab_dir / "hidden")]
    env = dict(os.environ)
    # the kit's root makes `autograder` importable; reference/ (last) makes `common` importable without installing
    env["PYTHONPATH"] = os.pathsep.join(
        [str(KIT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(KIT_ROOT / "reference")]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # never write .pyc files into a student's submission
    if not has_gpu_device():
        env.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton kernels run in the interpreter
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=KIT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAB_TIME_LIMIT_S * time_limit_scale)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise GraderError(f"{lab}: the grading run did not finish within {LAB_TIME_LIMIT_S} s")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # nothing the run started may outlive it
        except ProcessLookupError:
            pass
    text = output.decode(errors="replace")
    # pytest exit codes: 0 all passed, 1 some failed (a normal grading outcome); anything else is the grader's fault
    if process.returncode not in (0, 1) or not results_file.stat().st_size:
        raise GraderError(f"{lab}: pytest exited with code {process.returncode} after "
                          f"{time.monotonic() - started:.0f} s:\n{text[-4000:]}")
    data = json.loads(results_file.read_text())
    results_file.unlink()
    if not data["tests"]:
        raise GraderError(f"{lab}: no graded tests were collected")
    return [
        TestResult(lab=lab, name=t["name"], file=t["file"], outcome=t["outcome"], score=t["score"],
                   max_score=t["max_score"], message=t["message"], hidden=t["hidden"], doc=t["doc"],
                   duration_s=t["duration_s"])
        for t in data["tests"]
    ]
