"""The pytest plugin underneath the autograder: targets, points, and one forked process per graded test.

Graded tests carry `@pytest.mark.points(n)`. For each one, this plugin:

1. decides whether this machine can grade it (`@pytest.mark.gpu`, `@pytest.mark.gpus(n)`); if not, the test is
   recorded as "not graded here" and never run, so it counts neither as passed nor as failed;
2. forks a child in its own process group, with output sent to a size-capped file, and runs the test there. Student
   code therefore runs only in the child (tests import lab modules inside the test function, never at module level);
3. waits at most the test's time limit (`@pytest.mark.time_limit(s)`, default 60 s), then kills the child's whole
   process group, so a hang, a deadlock, a crash, `sys.exit` or `os._exit` costs that test and leaves no process;
4. checks that the child did not patch the functions tests use to compare results (torch.allclose, Tensor.__sub__,
   ...). A submission that monkeypatches them fails the test with a message saying what it patched.

Any skip raised while the test runs (a submission calling pytest.skip) is a failure, never a pass.
Results go to a JSON file (`--results`) that `autograder.runner` turns into the scorecard.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest

DEFAULT_TIME_LIMIT_S = 60.0
OUTPUT_LIMIT_BYTES = 64 * 1024 * 1024  # a child writing more than this is killed (SIGXFSZ)
MESSAGE_LIMIT_CHARS = 4000  # what a failure message keeps, from the end


# -----------------------------------------------------------------------------
# Options and markers


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("autograder")
    group.addoption("--target", default=None, help="labs (default, or $SLM_TARGET), reference, or a directory")
    group.addoption("--results", default=None, help="write per-test results as JSON to this file")
    group.addoption("--no-fork", action="store_true", help="run graded tests in-process (debugging only)")
    group.addoption("--time-limit-scale", type=float, default=1.0, help="multiply every test's time limit")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "points(n): points the test is worth")
    config.addinivalue_line("markers", "time_limit(seconds): wall-clock limit for the test (default 60)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; 'not graded here' without one")
    config.addinivalue_line("markers", "gpus(n): needs n CUDA GPUs (NCCL tests)")
    config.addinivalue_line("markers", "hidden: a hidden test (instructor copy only)")
    # NVML-based device queries do not initialise CUDA, so the parent stays safe to fork
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from common.target import default_target, use_target

    target = config.getoption("--target") or default_target()
    config._autograder_target = use_target(target)
    config._autograder_results = []


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


# -----------------------------------------------------------------------------
# Running one graded test


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    points = item.get_closest_marker("points")
    if points is None:
        return None  # not a graded test (the kit's own tests): pytest runs it normally
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    missing = _missing_hardware(item)
    absent_lab = _absent_lab(item)
    if absent_lab:
        record = _record(item, "failed", absent_lab, 0.0)
        reports = [_synthetic_report(item, "failed", absent_lab)]
    elif missing:
        record = _record(item, "not_graded", f"not graded here: {missing}", 0.0)
        reports = [_synthetic_report(item, "skipped", record["message"])]
    elif item.config.getoption("--no-fork"):
        from _pytest.runner import runtestprotocol

        start = time.monotonic()
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        record = _record_from_reports(item, reports, time.monotonic() - start)
    else:
        reports, record = _run_forked(item)
    item.config._autograder_results.append(record)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _run_forked(item: pytest.Item):
    limit = _time_limit(item)
    output = tempfile.TemporaryFile()
    read_end, write_end = os.pipe()
    snapshot = _watched_functions()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # ---- child: run the test, send serialised reports, exit without cleanup
        try:
            os.setpgid(0, 0)
            os.close(read_end)
            resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT_BYTES, OUTPUT_LIMIT_BYTES))
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; we want the child stopped, not EFBIG
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
            from _pytest.runner import runtestprotocol

            reports = runtestprotocol(item, nextitem=None, log=False)
            patched = _patched_since(snapshot)
            payload = {
                "reports": [item.config.hook.pytest_report_to_serializable(config=item.config, report=r)
                            for r in reports],
                "patched": patched,
            }
            data = json.dumps(payload, default=str).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)

    # ---- parent: read the child's answer until it closes the pipe, exits, or the time runs out
    os.close(write_end)
    os.set_blocking(read_end, False)
    chunks: list[bytes] = []
    timed_out, status = False, None
    while not _drain(read_end, chunks):
        waited, code = os.waitpid(pid, os.WNOHANG)
        if waited:
            status = code
            _drain(read_end, chunks)  # whatever it wrote before exiting
            break
        if time.monotonic() > start + limit:
            timed_out = True
            break
        time.sleep(0.01)
    _kill_group(pid)
    if status is None:
        _, status = os.waitpid(pid, 0)
    os.close(read_end)
    elapsed = time.monotonic() - start
    tail = _output_tail(output)

    if timed_out:
        message = f"timed out after {limit:.0f} s (a hang or deadlock?); the test's process group was killed"
        return _failed(item, message, tail, elapsed)
    try:
        payload = json.loads(b"".join(chunks).decode())
    except (ValueError, UnicodeDecodeError):
        payload = None
    if payload is None:
        how = _describe_exit(status)
        return _failed(item, f"the test process {how} before reporting a result (sys.exit, os._exit or a crash "
                             f"in the code under test?)", tail, elapsed)
    reports = [item.config.hook.pytest_report_from_serializable(config=item.config, data=d)
               for d in payload["reports"]]
    record = _record_from_reports(item, reports, elapsed)
    if payload["patched"]:
        # a pass obtained after patching the comparison machinery proves nothing, so it is a failure
        message = "the code under test patched library functions the grader relies on: " + ", ".join(payload["patched"])
        if record["outcome"] != "passed":
            message += "\n" + record["message"]
        return _failed(item, message, tail, elapsed)
    return reports, record


def _drain(fd: int, chunks: list[bytes]) -> bool:
    """Read what is available; True once the writer has closed the pipe."""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        chunks.append(chunk)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child and anything it started (distributed ranks) go together
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGXFSZ:
            return f"wrote more than {OUTPUT_LIMIT_BYTES // 2**20} MiB of output and was stopped"
        return f"was killed by signal {signal.Signals(signum).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _output_tail(output) -> str:
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - 2000))
    text = output.read().decode(errors="replace")
    output.close()
    return text


# -----------------------------------------------------------------------------
# Hardware gates


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


def _absent_lab(item: pytest.Item) -> str | None:
    """A message if this test's lab does not come from the target (never fall through to another tree)."""
    from common.target import check_lab, is_lab_name

    lab = next((p.name for p in Path(str(item.fspath)).parents if is_lab_name(p.name)), None)
    if lab is None:
        return None
    try:
        check_lab(lab, item.config._autograder_target)
    except ImportError as error:
        return f"{error}: nothing to grade"
    return None


def _time_limit(item: pytest.Item) -> float:
    marker = item.get_closest_marker("time_limit")
    limit = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT_S
    return limit * item.config.getoption("--time-limit-scale")


# -----------------------------------------------------------------------------
# Integrity: functions a submission must not patch


def _watched_functions() -> dict[str, object]:
    import torch
    import torch.testing

    watched = {f"torch.{name}": getattr(torch, name) for name in (
        "allclose", "isclose", "equal", "abs", "max", "min", "sum", "mean", "norm", "isfinite", "all", "any")}
    watched["torch.testing.assert_close"] = torch.testing.assert_close
    for name in ("__sub__", "__eq__", "__lt__", "__le__", "__gt__", "__ge__", "abs", "max", "sum", "all", "any",
                 "item", "tolist", "allclose", "equal", "double", "to", "detach", "backward"):
        watched[f"torch.Tensor.{name}"] = getattr(torch.Tensor, name)
    for name in ("abs", "max", "min", "sum", "len", "isinstance", "float", "round", "all", "any"):
        watched[f"builtins.{name}"] = getattr(builtins, name)
    watched["math.isclose"] = math.isclose
    watched["pytest.approx"] = pytest.approx
    watched["pytest.raises"] = pytest.raises
    from common import testing

    watched["common.testing.check_close"] = testing.check_close
    watched["common.testing.tolerance"] = testing.tolerance
    return watched


def _patched_since(snapshot: dict[str, object]) -> list[str]:
    now = _watched_functions()
    return sorted(name for name, function in snapshot.items() if now.get(name) is not function)


# -----------------------------------------------------------------------------
# Records and reports


def _record(item: pytest.Item, outcome: str, message: str, duration: float) -> dict:
    max_points = item._autograder_points
    return {
        "nodeid": item.nodeid,
        "file": Path(str(item.fspath)).name,
        "name": item.name,
        "doc": (item.function.__doc__ or "").strip().splitlines()[0] if getattr(item, "function", None)
        and item.function.__doc__ else "",
        "outcome": outcome,
        "score": max_points if outcome == "passed" else 0.0,
        "max_score": max_points,
        "hidden": item.get_closest_marker("hidden") is not None,
        "message": message[-MESSAGE_LIMIT_CHARS:],
        "duration_s": round(duration, 3),
    }


def _record_from_reports(item: pytest.Item, reports: list, duration: float) -> dict:
    for report in reports:
        if report.failed:
            where = "" if report.when == "call" else f" (in test {report.when})"
            return _record(item, "failed", _failure_text(report) + where, duration)
        if report.skipped:
            return _record(item, "failed", "the test was skipped while running, which never counts as a pass: "
                           + _failure_text(report), duration)
    if not any(report.when == "call" and report.passed for report in reports):
        return _record(item, "failed", "the test did not run to completion", duration)
    return _record(item, "passed", "", duration)


def _failure_text(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        # the last line of the exception, then the full traceback for context
        return f"{crash.message}\n\n{report.longreprtext}"
    return report.longreprtext or str(report.longrepr)


def _failed(item: pytest.Item, message: str, output_tail: str, duration: float):
    if output_tail.strip():
        message += "\n--- last output of the test ---\n" + output_tail
    record = _record(item, "failed", message, duration)
    return [_synthetic_report(item, "failed", message, duration)], record


def _synthetic_report(item: pytest.Item, outcome: str, message: str, duration: float = 0.0):
    from _pytest.reports import TestReport

    longrepr = message if outcome == "failed" else (str(item.fspath), item.location[1] or 0, message)
    return TestReport(nodeid=item.nodeid, location=item.location, keywords={}, outcome=outcome,
                      longrepr=longrepr, when="call", duration=duration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--results")
    if path:
        Path(path).write_text(json.dumps({
            "target": str(session.config._autograder_target),
            "tests": session.config._autograder_results,
        }, indent=1))
