"""Grade a class: every submission in a folder, for several labs, on this machine or across a Ray cluster.

    python -m autograder grade-many submissions/ --labs 01 03 --out grades/              # this machine
    python -m autograder grade-many submissions/ --labs 01 03 --out grades/ --ray auto   # a Ray cluster

`submissions/` holds one `<student>/` folder (laid out like labs/) or one `<student>.zip` per student. Every
(submission, lab) pair is one *task*, and a task is exactly what `python -m autograder grade LAB --target ...` does:
`runner.grade_lab` runs the lab's tests in a pytest subprocess, and student code runs only in its jailed workers. This
module adds no sandbox of its own; it adds placement, retries and the class's reports:

- a task gets its submission as bytes (a zip made here, or the student's own zip) and unpacks it into a private
  temporary folder (mode 0700) on whichever node runs it, so no task ever sees another student's files and the nodes
  need no shared filesystem for submissions. Folders are packed without following symbolic links;
- locally, `--jobs` tasks run at once (threads, each waiting on its own pytest process); on Ray, each task is one
  Ray task asking for the CPUs and GPUs its lab's tests need (`lab_needs`: the largest `gpus(n)`/`gpu` marker and the
  largest literal `world_size=` of the lab's test files), so NCCL tests land on a node with enough GPUs;
- a task that fails (the grader, not the submission: a lab run past its time limit, a worker that cannot start, a dead
  node) is retried up to `--retries` times (Ray's own task retries on a cluster), then recorded as "grader error":
  a distinct status, never a zero;
- each finished task is saved at once as `OUT/<student>/<lab>.json`; a re-run skips those whose submission has not
  changed (a content digest), unless `--force`. Grader errors are always retried on a re-run;
- at the end: `OUT/<student>/results.json` (Gradescope's format), `OUT/grades.csv` (a row per student: each lab's
  status, a column per part, the lab's total, the total), and `OUT/summary.md` with `OUT/summary.png` (the score
  distribution of each part, the parts the class lost most points on first).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from autograder import runner

SKIPPED_DIRS = ("__pycache__", ".git", ".ipynb_checkpoints", "__MACOSX")
MAX_SUBMISSION_BYTES = 256 * 2**20  # a folder larger than this is not packed (checkpoints, datasets)
STATUSES = ("graded", "missing", "grader error")


class SubmissionError(runner.GraderError):
    """A submission that cannot be packed (too large, unreadable)."""


# -----------------------------------------------------------------------------
# Submissions and what each lab needs


@dataclass(frozen=True)
class Submission:
    student: str
    path: Path  # a folder laid out like labs/, or a zip of one


def find_submissions(folder: str | os.PathLike, *, exclude: Path | None = None) -> list[Submission]:
    """Every `<student>/` folder and `<student>.zip` in `folder`, sorted by student name (`exclude`: the output
    folder, when it lies inside)."""
    root = Path(folder)
    if not root.is_dir():
        raise runner.GraderError(f"{folder!r} is not a folder of submissions")
    found: dict[str, Submission] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith((".", "__")) or path.is_symlink():
            continue
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        if path.is_dir() or (path.is_file() and path.suffix == ".zip"):
            student = path.stem if path.is_file() else path.name
            if student in found:
                raise runner.GraderError(f"student {student!r} has both a folder and a zip in {folder}")
            found[student] = Submission(student, path)
    if not found:
        raise runner.GraderError(f"no submission (a <student>/ folder or <student>.zip) in {folder}")
    return list(found.values())


def pack(submission: Submission) -> tuple[bytes, str]:
    """The submission as zip bytes, and a digest of its content (unchanged content, same digest)."""
    if submission.path.is_file():
        data = submission.path.read_bytes()
        return data, hashlib.sha256(data).hexdigest()
    digest, buffer, total = hashlib.sha256(), io.BytesIO(), 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for folder, dirs, files in os.walk(submission.path):  # never follows symbolic links to folders
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not Path(folder, d).is_symlink())
            for name in sorted(files):
                path = Path(folder, name)
                if path.is_symlink() or not path.is_file():
                    continue  # a link could point at another student's files
                total += path.stat().st_size
                if total > MAX_SUBMISSION_BYTES:
                    raise SubmissionError(f"{submission.student}: the submission is larger than "
                                          f"{MAX_SUBMISSION_BYTES >> 20} MiB")
                member = path.relative_to(submission.path).as_posix()
                data = path.read_bytes()
                digest.update(member.encode() + b"\0" + hashlib.sha256(data).digest())
                archive.writestr(member, data)
    return buffer.getvalue(), digest.hexdigest()


@dataclass(frozen=True)
class Needs:
    """What one task of a lab asks the scheduler for."""

    cpus: int
    gpus: int


# where reading the test files over-asks: lab 05's memory-accounting tests parametrize world sizes up to 16 for
# formulas, but its distributed tests start at most 4 ranks
NEEDS_OVERRIDES = {"lab05_zero": Needs(cpus=4, gpus=2)}


def lab_needs(lab: str) -> Needs:
    """CPUs and GPUs a lab's tests need, read from its test files: `gpus(n)`/`gpu` markers, and the largest literal
    `world_size=` or parametrized world size (a distributed test starts that many ranks)."""
    if lab in NEEDS_OVERRIDES:
        return NEEDS_OVERRIDES[lab]
    text = "\n".join(p.read_text(errors="replace") for p in sorted((runner.AUTOGRADER_DIR / lab).rglob("*.py")))
    gpus = [int(n) for n in re.findall(r"mark\.gpus\((\d+)\)", text)]
    gpus += [1] if re.search(r"mark\.gpu\b", text) else []
    world_sizes = [int(n) for n in re.findall(r"\bworld_size\s*=\s*(\d+)", text)]
    for values in re.findall(r"parametrize\(\s*[\"']world(?:_size)?[\"']\s*,\s*[\[(]([^\])]*)", text):
        world_sizes += [int(n) for n in re.findall(r"\d+", values)]  # parametrize("world_size", [1, 2, 4])
    return Needs(cpus=max([1, *world_sizes]), gpus=max([0, *gpus]))


# -----------------------------------------------------------------------------
# One task: one submission, one lab


def grade_task(student: str, lab: str, blob: bytes, options: runner.Options) -> dict:
    """Unpack `blob` into a private temporary folder and grade `lab` there, as `python -m autograder grade` does.

    Returns the task's record (plain data). Raises runner.GraderError when the grader failed (retried by the caller).
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grade-many-") as scratch:  # 0700: this task's alone
        archive = Path(scratch) / "submission.zip"
        archive.write_bytes(blob)
        with runner.open_target(str(archive)) as target_dir:
            archive.unlink()
            missing = not (target_dir / lab / "__init__.py").is_file()
            results, jail = runner.grade_lab(lab, target_dir, options)
    return {"student": student, "lab": lab, "status": "missing" if missing else "graded",
            "results": [dataclasses.asdict(r) for r in results], "jail": jail, "node": socket.gethostname(),
            "seconds": round(time.monotonic() - started, 2), "error": ""}


def _with_retries(student: str, lab: str, blob: bytes, options: runner.Options, retries: int) -> dict:
    """Local mode: a task, tried up to 1 + retries times."""
    error = ""
    for attempt in range(1, retries + 2):
        try:
            record = grade_task(student, lab, blob, options)
            return {**record, "attempts": attempt}
        except Exception as failure:  # noqa: BLE001 - any failure of the grader is retried, then reported
            error = f"{type(failure).__name__}: {failure}"
    return _grader_error(student, lab, error, retries + 1)


def _grader_error(student: str, lab: str, error: str, attempts: int) -> dict:
    return {"student": student, "lab": lab, "status": "grader error", "results": [], "jail": "", "node": "",
            "seconds": 0.0, "attempts": attempts, "error": error.strip()[-3000:]}


# -----------------------------------------------------------------------------
# The class run


@dataclass(frozen=True)
class Plan:
    """How to grade the class."""

    labs: tuple[str, ...]
    out: Path
    ray: str | None = None  # None: this machine; "auto", "local" or an address: a Ray cluster
    jobs: int | None = None  # local mode: tasks at once (default: from the cores and the labs' needs)
    retries: int = 2
    force: bool = False
    options: runner.Options = runner.Options()
    progress: str = "off"  # "bar", "lines" or "off"


def default_jobs(labs: list[str]) -> int:
    """Tasks at once on this machine: the cores over the most CPUs a lab needs; one at a time where a lab's GPU tests
    would run on this machine's GPUs (local tasks all see every GPU; a Ray cluster, even of one node, gives each task
    its own GPUs through CUDA_VISIBLE_DEVICES)."""
    needs = [lab_needs(lab) for lab in labs]
    if max(n.gpus for n in needs) and runner.has_gpu_device():
        return 1
    return max(1, (os.cpu_count() or 1) // max(n.cpus for n in needs))


def grade_many(folder: str | os.PathLike, plan: Plan) -> dict[str, dict[str, dict]]:
    """Grade every submission of `folder` for `plan.labs`; write the records and the reports under `plan.out`.

    Returns {student: {lab: record}}."""
    labs = [runner.resolve_lab(lab) for lab in plan.labs]
    submissions = find_submissions(folder, exclude=plan.out)
    plan.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, dict]] = {s.student: {} for s in submissions}
    todo = []  # (student, lab, blob, digest)
    for submission in submissions:
        try:
            blob, digest = pack(submission)
        except (OSError, SubmissionError) as error:
            for lab in labs:
                records[submission.student][lab] = {**_grader_error(submission.student, lab, str(error), 0),
                                                    "digest": ""}
            continue
        for lab in labs:
            saved = _record_path(plan.out, submission.student, lab)
            if saved.exists() and not plan.force:
                record = json.loads(saved.read_text())
                if record.get("status") != "grader error" and record.get("digest") == digest:
                    records[submission.student][lab] = record
                    continue
            todo.append((submission.student, lab, blob, digest))
    progress = _Progress(len(todo), skipped=sum(len(r) for r in records.values()), mode=plan.progress)
    run = _run_on_ray if plan.ray else _run_here
    for record, digest in run(todo, labs, plan) if todo else ():
        record["digest"] = digest
        _record_path(plan.out, record["student"], record["lab"]).write_text(json.dumps(record, indent=1))
        records[record["student"]][record["lab"]] = record
        progress.update(record)
    progress.close()
    write_reports(records, labs, plan.out)
    return records


def _record_path(out: Path, student: str, lab: str) -> Path:
    (out / student).mkdir(parents=True, exist_ok=True)
    return out / student / f"{lab}.json"


def _run_here(todo: list, labs: list[str], plan: Plan):
    """This machine: `jobs` tasks at once; each task waits on its own pytest process, so threads suffice."""
    jobs = plan.jobs or default_jobs(labs)
    # each task's torch gets its share of the cores (Ray does the same: OMP_NUM_THREADS = the task's CPUs); torch's
    # default, a thread per core in every task, made 2 tasks at once on 2 cores 2.5x slower per task than on Ray
    options = plan.options
    if options.threads is None:
        options = dataclasses.replace(options, threads=max(1, (os.cpu_count() or 1) // jobs))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_with_retries, student, lab, blob, options, plan.retries): digest
                   for student, lab, blob, digest in todo}
        for future in concurrent.futures.as_completed(futures):
            yield future.result(), futures[future]


def _run_on_ray(todo: list, labs: list[str], plan: Plan):
    """A Ray cluster: one Ray task per (submission, lab), with the lab's CPUs and GPUs; Ray places and retries."""
    try:
        import ray
    except ImportError:
        raise runner.GraderError("--ray needs Ray: pip install '.[instructor]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if plan.ray == "local" else plan.ray, log_to_driver=False, logging_level="ERROR")
        except ConnectionError as error:
            raise runner.GraderError(f"no Ray cluster at {plan.ray!r} ({error}); start one with `ray start --head`, "
                                     "or use --ray local") from None
    try:
        yield from _ray_tasks(ray, todo, plan)
    finally:
        if started:
            ray.shutdown()  # only our connection (and the cluster, when --ray local started one here)


def _ray_tasks(ray, todo: list, plan: Plan):
    # the kit's code on each node: the same checkout path everywhere (the README's cluster setup)
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(runner.KIT_ROOT), str(runner.KIT_ROOT / "labs")]),
                                "PYTHONDONTWRITEBYTECODE": "1"}}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    most_cpus = max(int(n.get("CPU", 1)) for n in nodes)
    most_gpus = max(int(n.get("GPU", 0)) for n in nodes)
    task = ray.remote(grade_task)
    pending = {}
    for student, lab, blob, digest in todo:
        needs = lab_needs(lab)
        # never ask for more than the largest node has, or the task would wait forever; without GPUs in the cluster,
        # the GPU tests are "not graded here" as on any machine without them
        ref = task.options(num_cpus=min(needs.cpus, most_cpus), num_gpus=min(needs.gpus, most_gpus),
                           max_retries=plan.retries, retry_exceptions=True, runtime_env=runtime_env,
                           name=f"grade {student} {lab}").remote(student, lab, blob, plan.options)
        pending[ref] = (student, lab, digest)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        student, lab, digest = pending.pop(ready[0])
        try:
            record = {**ray.get(ready[0]), "attempts": None}  # Ray counts the retries, not us
        except Exception as error:  # noqa: BLE001 - the task failed 1 + retries times (or its node died)
            record = _grader_error(student, lab, _last_lines(str(error)), plan.retries + 1)
        yield record, digest


def _last_lines(text: str, count: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


# -----------------------------------------------------------------------------
# Progress


class _Progress:
    """A bar on a terminal, a line per task in a log."""

    def __init__(self, total: int, *, skipped: int, mode: str):
        self.total, self.done, self.mode, self.started = total, 0, mode, time.monotonic()
        if mode != "off":
            print(f"[grade-many] {total} task(s) to grade, {skipped} already graded (--force regrades them)",
                  file=sys.stderr, flush=True)

    def update(self, record: dict) -> None:
        self.done += 1
        score = "" if record["status"] == "grader error" else "{:.4g}/{:.4g}".format(*_lab_score(record))
        what = f"{record['student']} {record['lab']} {record['status']} {score}".strip()
        if self.mode == "lines":
            print(f"[grade-many] {self.done}/{self.total} {what} ({record['seconds']:.0f} s)", file=sys.stderr,
                  flush=True)
        elif self.mode == "bar":
            filled = int(30 * self.done / max(self.total, 1))
            print(f"\r[grade-many] {'#' * filled}{'.' * (30 - filled)} {self.done}/{self.total} {what[:60]:<60}",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.mode != "off":
            print(f"{chr(13) if self.mode == 'bar' else ''}[grade-many] {self.done} task(s) in "
                  f"{time.monotonic() - self.started:.0f} s{' ' * 80}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Reports


def _results(record: dict) -> list[runner.TestResult]:
    return [runner.TestResult(**r) for r in record.get("results", [])]


def _lab_score(record: dict) -> tuple[float, float]:
    graded = [r for r in _results(record) if r.outcome != "not_graded"]
    return round(sum(r.score for r in graded), 6), round(sum(r.max_score for r in graded), 6)


def _parts(record: dict) -> dict[str, tuple[float, float]]:
    """Part (public test file) -> (score, max score) over the graded tests, hidden ones included."""
    parts: dict[str, tuple[float, float]] = {}
    for r in _results(record):
        if r.outcome == "not_graded":
            continue
        score, top = parts.get(r.part or r.file, (0.0, 0.0))
        parts[r.part or r.file] = (round(score + r.score, 6), round(top + r.max_score, 6))
    return parts


def gradescope(student: str, labs: dict[str, dict]) -> dict:
    """One student's results.json: the graded labs' tests; a lab the grader could not grade is a 0-point entry
    that says so (never a zero against the student), and its status is in extra_data."""
    card = runner.Scorecard(target=student)
    errors = []
    for lab, record in labs.items():
        card.results += _results(record)
        if record["status"] == "grader error":
            errors.append({"name": f"{lab}: grader error", "score": 0.0, "max_score": 0.0, "status": "failed",
                           "visibility": "visible",
                           "output": f"{lab} could not be graded (the grader failed, not your code); the "
                                     f"instructor will regrade it.\n{record['error']}"})
    result = card.gradescope()
    result["tests"] = errors + result["tests"]
    result["extra_data"] = {"labs": {lab: record["status"] for lab, record in labs.items()}}
    if errors:
        result["output"] = "Some labs could not be graded yet (grader error): " + ", ".join(
            e["name"].split(":")[0] for e in errors)
    return result


def write_reports(records: dict[str, dict[str, dict]], labs: list[str], out: Path) -> None:
    """results.json per student, grades.csv for the class, summary.md and summary.png."""
    for student, by_lab in records.items():
        ordered = {lab: by_lab[lab] for lab in labs if lab in by_lab}
        (out / student).mkdir(parents=True, exist_ok=True)
        (out / student / "results.json").write_text(json.dumps(gradescope(student, ordered), indent=2))
    # every part of every lab, in order, with its max score, from any record that has it
    parts: dict[str, dict[str, float]] = {lab: {} for lab in labs}
    for by_lab in records.values():
        for lab in labs:
            if lab in by_lab:
                for part, (_, top) in _parts(by_lab[lab]).items():
                    parts[lab].setdefault(part, top)
    header = ["student"]
    maxima = ["(max points)"]
    for lab in labs:
        header += [f"{lab}:status"] + [f"{lab}:{part}" for part in parts[lab]] + [f"{lab}:total"]
        maxima += [""] + [f"{top:g}" for top in parts[lab].values()] + [f"{sum(parts[lab].values()):g}"]
    header += ["total", "max_score"]
    maxima += [f"{sum(sum(p.values()) for p in parts.values()):g}", ""]
    with open(out / "grades.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerow(maxima)
        for student, by_lab in sorted(records.items()):
            row, total, top_total = [student], 0.0, 0.0
            for lab in labs:
                record = by_lab.get(lab, {"status": "grader error", "results": []})
                row.append(record["status"])
                if record["status"] == "grader error":  # never a zero: the cells stay empty
                    row += [""] * (len(parts[lab]) + 1)
                    continue
                scores = _parts(record)
                row += [f"{scores.get(part, (0.0, 0.0))[0]:g}" for part in parts[lab]]
                score, top = _lab_score(record)
                row.append(f"{score:g}")
                total, top_total = total + score, top_total + top
            writer.writerow(row + [f"{round(total, 6):g}", f"{round(top_total, 6):g}"])
    write_summary(records, labs, parts, out)


def write_summary(records: dict[str, dict[str, dict]], labs: list[str], parts: dict[str, dict[str, float]],
                  out: Path) -> None:
    """summary.md (per part: mean, full marks, zeros; the weakest first) and summary.png (a histogram per part).

    A part's distribution counts the students whose lab was graded (not missing, no grader error)."""
    fractions: dict[str, list[float]] = {}
    for lab in labs:
        for part, top in parts[lab].items():
            values = []
            for by_lab in records.values():
                record = by_lab.get(lab)
                if record is not None and record["status"] == "graded" and top > 0:
                    values.append(_parts(record).get(part, (0.0, top))[0] / top)
            fractions[f"{lab}:{part}"] = values
    ranked = sorted(fractions, key=lambda key: (sum(fractions[key]) / len(fractions[key])) if fractions[key] else 2)
    counts = {status: sum(1 for by_lab in records.values() for r in by_lab.values() if r["status"] == status)
              for status in STATUSES}
    lines = [f"# Grading summary: {len(records)} students, labs {', '.join(labs)}", "",
             "Tasks: " + ", ".join(f"{n} {status}" for status, n in counts.items()), "",
             "Parts, the ones the class lost most points on first (graded labs only):", "",
             "| part | max | students | mean | full marks | zero |", "|---|---|---|---|---|---|"]
    for key in ranked:
        values, (lab, part) = fractions[key], key.split(":", 1)
        if not values:
            lines.append(f"| {key} | {parts[lab][part]:g} | 0 | | | |")
            continue
        lines.append(f"| {key} | {parts[lab][part]:g} | {len(values)} | {100 * sum(values) / len(values):.0f}% | "
                     f"{sum(v >= 1 - 1e-9 for v in values)} | {sum(v <= 1e-9 for v in values)} |")
    errors = [f"- {r['student']} {r['lab']}: {r['error'].splitlines()[-1] if r['error'] else ''}"
              for by_lab in records.values() for r in by_lab.values() if r["status"] == "grader error"]
    if errors:
        lines += ["", "Grader errors (re-run grade-many to retry them):", "", *errors]
    lines += ["", "![score distribution per part](summary.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    _plot(ranked, fractions, out / "summary.png")


def _plot(ranked: list[str], fractions: dict[str, list[float]], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: nothing global, and PNGs render with Agg

    columns = 4
    rows = max(1, -(-len(ranked) // columns))
    figure = Figure(figsize=(3.2 * columns, 2.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    bins = [i / 10 for i in range(11)]
    for axis, key in zip(axes.flat, ranked):
        values = fractions[key]
        axis.hist(values, bins=bins, color="tab:blue", edgecolor="white")
        mean = f"mean {100 * sum(values) / len(values):.0f}%" if values else "no graded submission"
        lab, part = key.split(":", 1)
        axis.set_title(f"{lab}\n{part} ({mean})", fontsize=8)
        axis.set_xlim(0, 1)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(ranked):]:
        axis.axis("off")
    figure.supxlabel("fraction of the part's points", fontsize=9)
    figure.supylabel("students", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
