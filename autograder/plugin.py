"""The pytest plugin underneath the autograder: targets, points, time limits, and the student's code kept outside.

Graded tests carry `@pytest.mark.points(n)`. This process decides every verdict, and it never imports a submission:
a test runs the student's code through the `student` fixture (autograder/student.py), in a jailed worker, and gets
plain data back. For each graded test, this plugin:

1. decides whether this machine can grade it (`@pytest.mark.gpu`, `@pytest.mark.gpus(n)`); if not, the test is
   recorded as "not graded here" and never run, so it counts neither as passed nor as failed;
2. checks once per lab that the submission's lab imports at all, within a short limit; if it does not (missing, a
   crash or a hang at import), every test of the lab gets zero with that reason, in seconds;
3. runs the test with a deadline (`@pytest.mark.time_limit(s)`, default 60 s) that bounds the student's code it
   calls: a hang, a deadlock, a crash, `sys.exit` or `os._exit` costs that test, and the worker kills everything the
   code started;
4. records the outcome. A skip while the test runs is a failure, never a pass. A hidden test's message is its
   verdict alone: no traceback of the hidden test's source, and no output of the student's code.

Results go to a JSON file (`--results`) that `autograder.runner` turns into the scorecard. With `--progress-fd N`, a
JSON line per test goes to that descriptor as the test finishes (the runner draws a progress bar from them).
"""

from __future__ import annotations

import importlib.abc
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

DEFAULT_TIME_LIMIT_S = 60.0
MESSAGE_LIMIT_CHARS = 4000  # what a failure message keeps, from the start
LAB_PACKAGE = re.compile(r"^lab\d\d_\w+$")


# -----------------------------------------------------------------------------
# Options and markers


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("autograder")
    group.addoption("--target", default=None, help="labs (default, or $SLM_TARGET), reference, or a directory")
    group.addoption("--results", default=None, help="write per-test results as JSON to this file")
    group.addoption("--time-limit-scale", type=float, default=1.0, help="multiply every test's time limit")
    group.addoption("--jail", default=os.environ.get("SLM_JAIL", "auto"), choices=("auto", "require", "off"),
                    help="confine student code with bubblewrap: auto (when available), require, or off")
    group.addoption("--progress-fd", type=int, default=None,
                    help="write a JSON line per graded test to this file descriptor (the runner's progress pipe)")
    group.addoption("--fail-fast", action="store_true", help="stop at the first lost point (mutation testing)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "points(n): points the test is worth")
    config.addinivalue_line("markers", "time_limit(seconds): wall-clock limit for the test (default 60)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; 'not graded here' without one")
    config.addinivalue_line("markers", "gpus(n): needs n CUDA GPUs (NCCL tests)")
    config.addinivalue_line("markers", "hidden: a hidden test (instructor copy only)")
    config._autograder_results = []
    config._autograder_pool = None
    config._autograder_total = 0


def _pool(config: pytest.Config):
    """The run's workers, created on the first graded test (the kit's own tests never start one)."""
    if config._autograder_pool is None:
        from autograder import jail
        from autograder.student import Limits, Pool, Setup
        from common.target import default_target, has_gpu_device, resolve_target

        target = config.getoption("--target") or default_target()
        jailed = jail.resolve_mode(config.getoption("--jail"))
        gpu = has_gpu_device()
        config._autograder_pool = Pool(Setup(submission=resolve_target(target), jailed=jailed,
                                             limits=Limits.default(gpu=gpu), gpu=gpu,
                                             time_limit_scale=config.getoption("--time-limit-scale")))
        config._autograder_jail = jail.status().describe() if jailed else (
            "no jail (--jail off)" if config.getoption("--jail") == "off" else jail.status().describe())
        sys.meta_path.insert(0, _NoLabImports())
    return config._autograder_pool


class _NoLabImports(importlib.abc.MetaPathFinder):
    """The grading process never imports a lab: tests reach student code only through `student.run`."""

    def find_spec(self, name, path=None, target=None):
        if LAB_PACKAGE.match(name.split(".")[0]):
            raise ImportError(f"the grading process never imports {name}: run student code with student.run(...)")
        return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    cases: dict[tuple[str, str], int] = {}
    for item in items:
        # tests under a hidden/ folder are the instructor's: never released, reported after publication
        if "hidden" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.hidden)
        key = (str(item.fspath), getattr(item, "originalname", item.name))
        cases[key] = cases.get(key, 0) + 1
    for item in items:
        marker = item.get_closest_marker("points")
        if marker is not None:
            # points(n) on a parametrized test is the test's total, shared evenly by its cases
            key = (str(item.fspath), getattr(item, "originalname", item.name))
            item._autograder_points = float(marker.args[0]) / cases[key]
    # public tests first, hidden ones last, each in file order
    items.sort(key=lambda item: item.get_closest_marker("hidden") is not None)
    if items:
        items[0].config._autograder_total = sum(1 for item in items if item.get_closest_marker("points"))


@pytest.fixture
def student(request: pytest.FixtureRequest):
    """Runs the submission's code for this test: `student.run(producer, *args, **kwargs)`."""
    from autograder.student import Student

    item = request.node
    lab = _lab_of(item)
    if lab is None:
        raise RuntimeError(f"{item.nodeid}: the student fixture is for tests under autograder/<lab>/")
    deadline = getattr(item, "_autograder_deadline", time.monotonic() + DEFAULT_TIME_LIMIT_S)
    return Student(_pool(item.config), lab, hidden=item.get_closest_marker("hidden") is not None,
                   deadline=deadline, test_name=item.name)


# -----------------------------------------------------------------------------
# Running one graded test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    points = item.get_closest_marker("points")
    if points is None:
        return None  # not a graded test (the kit's own tests): pytest runs it normally
    config = item.config
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    # a test "not graded here" (no GPU) lost no point: it must not stop the run
    if config.getoption("--fail-fast") and any(r["outcome"] == "failed" for r in config._autograder_results):
        record = _record(item, "failed", "not run: an earlier test already lost points (--fail-fast)", 0.0)
        reports = [_synthetic_report(item, "failed", record["message"])]
    elif (missing := _missing_hardware(item)) is not None:
        record = _record(item, "not_graded", f"not graded here: {missing}", 0.0)
        reports = [_synthetic_report(item, "skipped", record["message"])]
    elif (broken := _broken_lab(item)) is not None:
        record = _record(item, "failed", broken, 0.0)
        reports = [_synthetic_report(item, "failed", broken)]
    else:
        from _pytest.runner import runtestprotocol

        start = time.monotonic()
        item._autograder_deadline = start + _time_limit(item)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        record = _record_from_reports(item, reports, time.monotonic() - start)
        if record["outcome"] == "failed" and item.get_closest_marker("hidden"):
            reports = [_synthetic_report(item, "failed", record["message"], record["duration_s"])]
    config._autograder_results.append(record)
    if config.getoption("--progress-fd") is not None:
        progress = {"done": len(config._autograder_results), "total": config._autograder_total,
                    "outcome": record["outcome"], "label": record["label"], "part": record["part"],
                    "score": record["score"], "max_score": record["max_score"], "seconds": record["duration_s"]}
        # a descriptor of its own: pytest captures stdout and stderr around tests
        os.write(config.getoption("--progress-fd"), (json.dumps(progress) + "\n").encode())
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _lab_of(item: pytest.Item) -> str | None:
    return next((p.name for p in Path(str(item.fspath)).parents if LAB_PACKAGE.match(p.name)), None)


def _broken_lab(item: pytest.Item) -> str | None:
    """Why the submission's lab cannot be graded at all (missing, or failing to import), or None."""
    lab = _lab_of(item)
    if lab is None or "student" not in getattr(item, "fixturenames", ()):
        return None
    check = _pool(item.config).import_check(lab)
    return None if check.ok else check.message


def _missing_hardware(item: pytest.Item) -> str | None:
    needs_gpus = 0
    if item.get_closest_marker("gpu"):
        needs_gpus = 1
    marker = item.get_closest_marker("gpus")
    if marker:
        needs_gpus = max(needs_gpus, int(marker.args[0]))
    if needs_gpus == 0:
        return None
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < needs_gpus:
        return f"needs {needs_gpus} CUDA GPU(s), this machine has {available}"
    return None


def _time_limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("time_limit")
    limit = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT_S
    return limit * item.config.getoption("--time-limit-scale")


# -----------------------------------------------------------------------------
# Records and reports


def _record(item: pytest.Item, outcome: str, message: str, duration: float) -> dict:
    max_points = item._autograder_points
    function = getattr(item, "function", None)
    doc = (function.__doc__ or "").strip().splitlines() if function is not None and function.__doc__ else []
    file = Path(str(item.fspath)).name
    return {
        "nodeid": item.nodeid,
        "file": file,
        "part": re.sub(r"_hidden\w*\.py$", ".py", file),  # hidden/test_plans_hidden.py belongs to test_plans.py
        "name": item.name,
        "label": _readable_name(item),
        "summary": _summary(message),
        "doc": doc[0] if doc else "",
        "outcome": outcome,
        "score": max_points if outcome == "passed" else 0.0,
        "max_score": max_points,
        "hidden": item.get_closest_marker("hidden") is not None,
        "message": _clip(message),
        "duration_s": round(duration, 3),
    }


def _readable_name(item: pytest.Item) -> str:
    """test_plan_segments (num_blocks=6, plan=every_k k=1), not test_plan_segments[6-plan1-expected1]."""
    name = getattr(item, "originalname", None) or item.name
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return name
    parts = []
    for key, value in callspec.params.items():
        if key.startswith(("expected", "want")):  # the expectation is not an input
            continue
        if isinstance(value, dict):
            text = " ".join(f"{k}={v}" if k != "plan" else str(v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            text = "x".join(map(str, value)) if all(isinstance(v, int) for v in value) else repr(value)
        elif isinstance(value, type(item)) or callable(value):
            text = getattr(value, "__name__", repr(value))
        else:
            text = str(value)
        text = text if len(text) <= 28 else text[:25] + "..."
        parts.append(f"{key}={text}" if not isinstance(value, dict) else text)
    return f"{name} ({', '.join(parts)})" if parts else name


def _summary(message: str) -> str:
    """The line of a failure that says what went wrong: the first, or, when that only introduces a traceback (a
    distributed rank's), the exception at the traceback's end."""
    head = message.split("\nTraceback (in the submission)")[0].split("\n--- output")[0].strip()
    lines = [line.strip() for line in head.splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        exceptions = [line for line in lines[1:] if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
        return f"{first} {exceptions[-1] if exceptions else lines[-1]}"
    return first


def _clip(message: str) -> str:
    if len(message) <= MESSAGE_LIMIT_CHARS:
        return message
    return message[: MESSAGE_LIMIT_CHARS - 40] + "\n[... message cut ...]"


def _record_from_reports(item: pytest.Item, reports: list, duration: float) -> dict:
    hidden = item.get_closest_marker("hidden") is not None
    for report in reports:
        if report.failed:
            where = "" if report.when == "call" else f" (in test {report.when})"
            return _record(item, "failed", _failure_text(report, hidden=hidden) + where, duration)
        if report.skipped:
            return _record(item, "failed", "the test was skipped while running, which never counts as a pass: "
                           + _failure_text(report, hidden=hidden), duration)
    if not any(report.when == "call" and report.passed for report in reports):
        return _record(item, "failed", "the test did not run to completion", duration)
    return _record(item, "passed", "", duration)


def _failure_text(report, *, hidden: bool) -> str:
    """The exception's message first; public tests add the traceback, hidden ones never show their source."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        if hidden:
            # the verdict alone: pytest's assertion explanation would quote the hidden test's source
            return crash.message.split("\nassert ")[0]
        return f"{crash.message}\n\n{report.longreprtext}"
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])
    return report.longreprtext or str(report.longrepr)


def _synthetic_report(item: pytest.Item, outcome: str, message: str, duration: float = 0.0):
    from _pytest.reports import TestReport

    longrepr = message if outcome == "failed" else (str(item.fspath), item.location[1] or 0, message)
    return TestReport(nodeid=item.nodeid, location=item.location, keywords={}, outcome=outcome,
                      longrepr=longrepr, when="call", duration=duration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    pool = session.config._autograder_pool
    if pool is not None:
        pool.close()
    path = session.config.getoption("--results")
    if path:
        Path(path).write_text(json.dumps({
            "target": str(pool.setup.submission) if pool is not None else "",
            "jail": getattr(session.config, "_autograder_jail", ""),
            "tests": session.config._autograder_results,
        }, indent=1))
