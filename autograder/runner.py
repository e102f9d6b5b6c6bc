"""Grade one lab or all of them against a target, and turn the results into a scorecard, results.json and CSV.

Each lab runs as one pytest process (in its own session, with an overall time limit) using `autograder.plugin`, which
forks every graded test. This module never imports torch or student code, so it cannot be broken by either.

    card = grade(["lab01_memory"], target="reference")
    print(card.table())
    card.write_gradescope("results.json")
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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


@contextlib.contextmanager
def open_target(target: str):
    """The directory holding the lab packages of `target`: 'labs', 'reference', a directory laid out like labs/, or a
    .zip of one (unpacked to a temporary directory that is removed afterwards)."""
    if target.endswith(".zip"):
        path = Path(target)
        if not path.is_file():
            raise GraderError(f"target {target!r}: no such zip file")
        unpacked = Path(tempfile.mkdtemp(prefix="submission-"))
        try:
            yield _unzip_submission(path.resolve(), unpacked)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
        return
    try:
        directory = resolve_target_dir(target)
    except FileNotFoundError:
        raise GraderError(f"target {target!r} is neither 'labs', 'reference', a directory nor a .zip") from None
    if LAB_PATTERN.match(directory.name) and (directory / "__init__.py").exists():
        raise GraderError(f"target {target!r} is a lab folder; give the folder that holds it: "
                          f"--target {Path(target).parent.as_posix() or '.'}")
    yield directory


def _unzip_submission(path: Path, out: Path) -> Path:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise GraderError(f"{path.name}: refusing the unsafe path {member!r}")
            archive.extractall(out)
    except zipfile.BadZipFile:
        raise GraderError(f"{path.name} is not a valid zip file") from None
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
    part: str = ""  # the public test file this test is graded with (hidden tests too)
    label: str = ""  # a readable name: the test and its parameters
    summary: str = ""  # the one line that says what went wrong

    @property
    def shown_name(self) -> str:
        return (self.label or self.name) + (" [hidden]" if self.hidden else "")


STATUS = {"passed": "PASS", "failed": "FAIL", "not_graded": "NOT GRADED HERE"}


@dataclass
class Scorecard:
    target: str
    results: list[TestResult] = field(default_factory=list)
    jail: str = ""  # how student code was confined (autograder/jail.py)

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
        """The scorecard: per lab, per part (with subtotals), one row per test; then the failure messages.

        A lab whose every test failed for one reason (missing, or not importing) is one line with that reason."""
        lines = [f"Target: {self.target}", f"Student code ran in: {self.jail or 'no worker was needed'}", ""]
        width = min(56, max([len(r.shown_name) for r in self.results] + [24]))
        for lab in self.labs():
            rows = [r for r in self.results if r.lab == lab]
            graded = [r for r in rows if r.outcome != "not_graded"]
            lab_score, lab_max = sum(r.score for r in graded), sum(r.max_score for r in graded)
            reasons = {r.message for r in graded}
            if graded and lab_score == 0 and len(reasons) == 1 and len(graded) > 1:
                lines += [f"{lab}  {lab_score:.4g} / {lab_max:.4g}   every test: {graded[0].summary}", ""]
                continue
            lines.append(f"{lab}  {lab_score:.4g} / {lab_max:.4g}")
            for part in dict.fromkeys(r.part or r.file for r in rows):
                in_part = [r for r in rows if (r.part or r.file) == part]
                scored = [r for r in in_part if r.outcome != "not_graded"]
                lines.append(f"  {part:<{width + 20}} {sum(r.score for r in scored):>6.3g} / "
                             f"{sum(r.max_score for r in scored):.3g}")
                for r in in_part:
                    name = r.shown_name if len(r.shown_name) <= width else r.shown_name[: width - 3] + "..."
                    reason = r.summary[:70] if r.outcome != "passed" else ""
                    lines.append(f"    {STATUS[r.outcome]:<15} {r.score:>5.3g}/{r.max_score:<5.3g} {name:<{width}} "
                                 f"{reason}".rstrip())
            lines.append("")
        not_graded = [r for r in self.results if r.outcome == "not_graded"]
        lines.append(f"TOTAL  {self.score:.4g} / {self.max_score:.4g}"
                     + (f"   ({len(not_graded)} tests, {sum(r.max_score for r in not_graded):g} points, "
                        "not graded here: they need hardware this machine lacks)" if not_graded else ""))
        failures = [r for r in self.results if r.outcome == "failed"]
        collapsed = {lab for lab in self.labs() if len({r.message for r in failures if r.lab == lab}) == 1
                     and all(r.score == 0 for r in self.graded if r.lab == lab)}
        if verbose and failures:
            lines += ["", "Failures", "--------"]
            for r in failures:
                if r.lab in collapsed and r is not next(f for f in failures if f.lab == r.lab):
                    continue
                lines += [f"[{r.lab}] {r.part or r.file} :: {r.shown_name}", _indent(r.message.strip()[:1500]), ""]
        return "\n".join(lines)

    def gradescope(self) -> dict:
        """Gradescope's results.json: top-level score and max_score, and one entry per test."""
        tests = []
        for r in self.results:
            entry = {
                "name": f"{r.lab}: {r.part or r.file}: {r.label or r.name}",
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
            writer.writerow(["lab", "part", "test", "outcome", "score", "max_score", "hidden", "message"])
            for r in self.results:
                writer.writerow([r.lab, r.part or r.file, r.label or r.name, r.outcome, r.score, r.max_score,
                                 r.hidden, r.summary])


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


# -----------------------------------------------------------------------------
# Progress


def _follow_progress(fd: int, lab: str, mode: str) -> None:
    """Render the plugin's progress events as a bar (a terminal) or plain lines (CI logs)."""
    started = time.monotonic()
    done = total = 0
    with os.fdopen(fd, "rb") as stream:
        for raw in stream:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            done, total = event["done"], event["total"]
            status = STATUS[event["outcome"]]
            if mode == "lines":
                print(f"[{lab}] {done}/{total} {status} {event['score']:.3g}/{event['max_score']:.3g} "
                      f"{event['part']} :: {event['label']} ({event['seconds']:.1f} s)", file=sys.stderr, flush=True)
            elif mode == "bar":
                filled = int(30 * done / max(total, 1))
                label = f"{event['part']} :: {event['label']}"[:60]
                print(f"\r[{lab}] {'#' * filled}{'.' * (30 - filled)} {done}/{total} {label:<60}", end="",
                      file=sys.stderr, flush=True)
    if mode == "bar" and total:
        print(f"\r[{lab}] {done}/{total} tests in {time.monotonic() - started:.0f} s{' ' * 90}", file=sys.stderr,
              flush=True)


# -----------------------------------------------------------------------------
# Running pytest


@dataclass(frozen=True)
class Options:
    """How to grade: which tests, how strictly confined, how patient."""

    tests: tuple[str, ...] = ()  # only these test files of each lab (e.g. "test_checkpoint.py")
    include_hidden: bool = True
    time_limit_scale: float = 1.0
    jail: str = "auto"  # auto | require | off (autograder/jail.py)
    progress: str = "off"  # while grading, on stderr: "bar" (a terminal), "lines" (CI logs) or "off"
    fail_fast: bool = False  # stop a lab at its first lost point (mutation testing)
    lab_time_limit_s: float | None = None  # one lab's whole run (default LAB_TIME_LIMIT_S x time_limit_scale)
    threads: int | None = None  # OMP/MKL threads of the run's processes (grade-many: the cores over the jobs)


def grade(labs: list[str], target: str, options: Options = Options()) -> Scorecard:
    """Grade `labs` against `target` ("labs", "reference", a directory laid out like labs/, or a zip of one)."""
    with open_target(target) as target_dir:
        card = Scorecard(target=target)  # as the user named it: no instructor paths in the scorecard
        for lab in labs:
            results, jail_used = grade_lab(resolve_lab(lab), target_dir, options)
            card.results += results
            card.jail = jail_used
    return card


def grade_lab(lab: str, target_dir: Path, options: Options) -> tuple[list[TestResult], str]:
    lab_dir = AUTOGRADER_DIR / lab
    paths = [lab_dir]
    if options.tests:
        # a part's hidden tests sit in hidden/<part stem>_hidden.py and are graded with it (when present)
        paths = [lab_dir / t for t in options.tests]
        for path in paths:
            if not path.exists():
                raise GraderError(f"{lab}: no test file {path.name}")
        if options.include_hidden:
            paths += [p for t in options.tests for p in sorted((lab_dir / "hidden").glob(f"{Path(t).stem}_hidden*.py"))]
    results_file = Path(tempfile.mkstemp(prefix=f"{lab}-", suffix=".json")[1])
    command = [
        sys.executable, "-m", "pytest", *map(str, paths),
        "-p", "autograder.plugin", "--target", str(target_dir), "--results", str(results_file),
        "--time-limit-scale", str(options.time_limit_scale), "--jail", options.jail,
        "-q", "--no-header", "--tb=short", "--import-mode=importlib", "-p", "no:cacheprovider",
        "--rootdir", str(KIT_ROOT), "-o", "addopts=",
    ]
    progress_read = progress_write = None
    if options.progress != "off":
        progress_read, progress_write = os.pipe()
        command += ["--progress-fd", str(progress_write)]
    if options.fail_fast:
        command.append("--fail-fast")
    if not options.include_hidden:
        command += ["--ignore", str(lab_dir / "hidden")]
    env = dict(os.environ)
    # the kit's root makes `autograder` importable; labs/ (last) makes `common` importable without installing.
    # No lab is ever imported by this process or by pytest: student code runs only in the jailed workers.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(KIT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(KIT_ROOT / "labs")]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if options.threads:
        # several labs graded at once: torch's default of a thread per core in each would oversubscribe the cores
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(options.threads)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=KIT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, pass_fds=(progress_write,) if progress_write else ())
    reader = None
    if progress_write is not None:
        os.close(progress_write)  # the child holds the write end; EOF arrives when it exits
        reader = threading.Thread(target=_follow_progress, args=(progress_read, lab, options.progress), daemon=True)
        reader.start()
    limit = options.lab_time_limit_s or LAB_TIME_LIMIT_S * options.time_limit_scale
    try:
        output, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise GraderError(f"{lab}: the grading run did not finish within {limit:.0f} s")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # nothing the run started may outlive it
        except ProcessLookupError:
            pass
        if reader is not None:
            reader.join(timeout=5)
    text = output.decode(errors="replace")
    # pytest exit codes: 0 all passed, 1 some failed (a normal grading outcome); anything else is the grader's fault
    if process.returncode not in (0, 1) or not results_file.stat().st_size:
        results_file.unlink(missing_ok=True)
        raise GraderError(f"{lab}: pytest exited with code {process.returncode} after "
                          f"{time.monotonic() - started:.0f} s:\n{text[-4000:]}")
    data = json.loads(results_file.read_text())
    results_file.unlink()
    if not data["tests"]:
        raise GraderError(f"{lab}: no graded tests were collected")
    results = [
        TestResult(lab=lab, name=t["name"], file=t["file"], outcome=t["outcome"], score=t["score"],
                   max_score=t["max_score"], message=t["message"], hidden=t["hidden"], doc=t["doc"],
                   duration_s=t["duration_s"], part=t["part"], label=t["label"], summary=t["summary"])
        for t in data["tests"]
    ]
    return results, data.get("jail", "")
