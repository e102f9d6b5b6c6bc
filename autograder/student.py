"""How a graded test runs student code: in a jailed worker, getting data back.

The grader process (pytest with autograder.plugin) never imports a submission. A test asks for the `student` fixture
and hands it a *producer*, a top-level function of a test module that calls the student's code and returns plain data:

    def checkpoint_gradients(seed: int, width: int) -> dict:          # runs in the worker
        from lab01_memory.checkpoint import checkpoint
        ...
        return {"y": y, "dx": x.grad}

    @pytest.mark.points(4)
    def test_gradients_match(student):                               # runs in the grader
        got = student.run(checkpoint_gradients, seed=1, width=12)
        check_close(got["dx"], expected_dx(seed=1, width=12), name="checkpoint (gradient of x)", ...)

`student.run` sends the producer's name and its arguments (torch.save, plain data only) to a worker, which forks a
child, imports the submission there, calls the producer and sends the result back. The grader loads it with
`torch.load(weights_only=True)`: tensors, numbers, strings, lists, tuples and dicts, never code. Comparisons, points
and the verdict happen here, where the student's code cannot reach.

If the student's code raises, `student.run` raises a `StudentError` that is also an instance of the nearest built-in
exception class, so `pytest.raises(ValueError, match="divisible")` works as usual. A crash or a time-out raises
`StudentCrash` or `StudentTimeout`.

Producers live in the lab's public test files (or a helper module beside them, like lab 03's workers.py). A hidden
test may call public producers; producers of its own live in `hidden/<name>.py` files that are not test files, so the
worker sees the code that calls the student's functions, never a hidden test's expectations. A producer module imports
nothing from `autograder` and never imports the lab at module level (the worker refuses).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from autograder import jail

KIT_ROOT = Path(__file__).resolve().parent.parent
AUTOGRADER_DIR = KIT_ROOT / "autograder"
SHARED_DIR = KIT_ROOT / "labs"  # holds common/, the shared code (only common/ is ever mounted)
STARTUP_LIMIT_S = 120.0  # starting a worker: python, torch, the producer modules
GRACE_S = 15.0  # beyond a request's own limit, for the worker to kill and clean up before we kill the jail


class StudentError(Exception):
    """The student's code raised, crashed or ran out of time inside the worker."""

    def __init__(self, message: str, *, types: tuple[str, ...] = (), detail: str = "", output: str = ""):
        super().__init__(message)
        self.types = types  # the raised exception's class and its bases, by name
        self.detail = detail  # the traceback frames inside the submission
        self.output = output  # the tail of what the code printed


class StudentCrash(StudentError):
    """The worker's child died without a result (segfault, os._exit, a limit)."""


class StudentTimeout(StudentError):
    """The student's code did not finish within the test's time limit."""


class GraderError(RuntimeError):
    """The grader or a test was wrong (not the submission): a bad producer, a worker that cannot start."""


# -----------------------------------------------------------------------------
# Limits and setup


@dataclass(frozen=True)
class Limits:
    """What each child of a worker may use. Memory is per process (RLIMIT_AS), so unset where CUDA needs the space."""

    memory_bytes: int | None = None
    processes: int | None = None
    open_files: int = 4096
    file_bytes: int = 64 * 2**20
    result_bytes: int = 256 * 2**20

    @staticmethod
    def default(*, gpu: bool) -> "Limits":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 16 * 2**30
        # CUDA reserves far more address space than it uses, so RLIMIT_AS would break it: no memory cap on GPUs
        memory = None if gpu else int(min(16 * 2**30, max(4 * 2**30, total // 2)))
        return Limits(memory_bytes=memory, processes=_tasks_of_this_user() + 2048)


def _tasks_of_this_user() -> int:
    """Threads this user runs now (RLIMIT_NPROC counts threads of the real uid, machine-wide)."""
    uid, count = os.getuid(), 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return count


@dataclass
class Setup:
    """One grading run's fixed facts: what is graded, how confined, with which limits."""

    submission: Path  # the folder holding the lab packages (labs/, reference/, or a student's)
    jailed: bool
    limits: Limits
    gpu: bool
    time_limit_scale: float = 1.0


# -----------------------------------------------------------------------------
# Producer modules


def producer_files(lab: str, *, hidden: bool) -> dict[str, Path]:
    """Module name -> file of the modules a worker may import producers from.

    Public workers: the lab's public test files and helper modules. Hidden workers: those, plus the non-test modules
    under hidden/ (hidden/test_*.py, which hold the expectations, are never given to a worker)."""
    lab_dir = AUTOGRADER_DIR / lab
    files = {p.stem: p for p in sorted(lab_dir.glob("*.py")) if p.name not in ("conftest.py", "__init__.py")}
    if hidden:
        for path in sorted((lab_dir / "hidden").glob("*.py")):
            if path.name.startswith("test_") or path.name in ("conftest.py", "__init__.py"):
                continue
            if path.stem in files:
                raise GraderError(f"{lab}: hidden/{path.name} has the name of a public module; rename it")
            files[path.stem] = path
    return files


def _producer_address(producer) -> tuple[str, str, Path]:
    """(module name in the worker, qualified name, file) of a top-level producer function."""
    if not callable(producer):
        raise GraderError(f"student.run needs a function, got {type(producer).__name__}")
    qualname = getattr(producer, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname or not qualname:
        raise GraderError(f"producer {qualname or producer!r} must be a top-level function of a test module "
                          "(the worker imports it by name)")
    module = sys.modules.get(producer.__module__)
    path = Path(getattr(module, "__file__", "") or "").resolve()
    if not path.is_file():
        raise GraderError(f"cannot find the file of producer {qualname} (module {producer.__module__})")
    return path.stem, qualname, path


# -----------------------------------------------------------------------------
# One worker: a jailed process that forks a child per request


class Worker:
    """A worker process (jailed when setup.jailed) that runs producers from `files`, started lazily."""

    def __init__(self, setup: Setup, lab: str, files: dict[str, Path], label: str):
        self.setup, self.lab, self.files, self.label = setup, lab, files, label
        self.process: subprocess.Popen | None = None
        self.stderr = None
        self.scratch: Path | None = None

    # ---- lifecycle

    def start(self) -> None:
        self.stderr = tempfile.TemporaryFile()
        env = self._environment()
        if self.setup.jailed:
            command = jail.worker_command(python=sys.executable, kit_root=KIT_ROOT, shared_dir=SHARED_DIR,
                                          submission=self.setup.submission, producer_files=self.files, env=env)
            sys_path = [jail.GRADER_MOUNT, jail.SHARED_MOUNT, jail.SUBMISSION_MOUNT]
            submission = jail.SUBMISSION_MOUNT
            cwd = None
        else:
            # unconfined: the same layout from symlinks, so the kit's other files are at least not on the path
            self.scratch = Path(tempfile.mkdtemp(prefix="slm-worker-"))
            (self.scratch / "grader").mkdir()
            (self.scratch / "kit").mkdir()
            (self.scratch / "tmp").mkdir()
            for name, path in self.files.items():
                (self.scratch / "grader" / f"{name}.py").symlink_to(path)
            (self.scratch / "kit" / "common").symlink_to(SHARED_DIR / "common")
            env.update(TMPDIR=str(self.scratch / "tmp"), HOME=str(self.scratch / "tmp"))
            command = [sys.executable, "-I", "-B", "-u", str(jail.WORKER_SCRIPT)]
            sys_path = [str(self.scratch / "grader"), str(self.scratch / "kit"), str(self.setup.submission)]
            submission = str(self.setup.submission)
            cwd = str(self.scratch / "tmp")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        env=env, cwd=cwd, start_new_session=True)
        limits = self.setup.limits
        config = {"sys_path": sys_path, "lab": self.lab, "submission": submission,
                  "pid_namespace": self.setup.jailed, "preload": ["common"],
                  "limits": {"memory_bytes": limits.memory_bytes, "processes": limits.processes,
                             "open_files": limits.open_files, "file_bytes": limits.file_bytes,
                             "result_bytes": limits.result_bytes}}
        self._send(json.dumps(config).encode())
        deadline = time.monotonic() + STARTUP_LIMIT_S * self.setup.time_limit_scale
        ready = self._receive(deadline)
        answer = json.loads(ready) if ready else None
        if not answer or not answer.get("ready"):
            detail = (answer or {}).get("error") or self._stderr_tail()
            self.close()
            raise GraderError(f"the {self.label} grading worker for {self.lab} could not start:\n{detail}")

    def _environment(self) -> dict[str, str]:
        env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
               "HOME": "/tmp/home", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONUNBUFFERED": "1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1", "MPLBACKEND": "Agg",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NCCL_NVLS_ENABLE": "0"}
        for key in ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_HOME", "TRITON_INTERPRET"):
            if key in os.environ:
                env[key] = os.environ[key]
        env["SLM_TIME_LIMIT_SCALE"] = repr(self.setup.time_limit_scale)  # run_distributed's limits stretch with it
        if not self.setup.gpu:
            env["TRITON_INTERPRET"] = "1"  # no GPU: Triton kernels run in the interpreter (set before they are defined)
        return env

    def close(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.kill()
            except ProcessLookupError:
                pass
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.process = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ---- requests

    def request(self, header: dict, blob: bytes, timeout_s: float) -> tuple[dict, bytes]:
        """Send one request; return (reply, result bytes). A worker that stops answering is killed and restarted
        on the next request; the reply then says the request timed out or died."""
        if not self.alive:
            self.close()
            self.start()
        header = {**header, "timeout_s": max(0.5, timeout_s)}
        try:
            self._send(json.dumps(header).encode())
            self._send(blob)
        except (BrokenPipeError, OSError):
            self.close()
            return {"status": "died", "exit": "the worker was gone", "output": ""}, b""
        deadline = time.monotonic() + header["timeout_s"] + GRACE_S
        reply = self._receive(deadline)
        result = self._receive(deadline) if reply is not None else None
        if reply is None or result is None:
            timed_out = time.monotonic() >= deadline
            self.close()  # the jail and everything in it
            return {"status": "timeout" if timed_out else "died", "exit": "the worker stopped answering",
                    "output": ""}, b""
        try:
            decoded = json.loads(reply)
        except ValueError:
            self.close()
            return {"status": "died", "exit": "the worker sent garbage", "output": ""}, b""
        if not isinstance(decoded, dict) or decoded.get("status") not in ("done", "died", "timeout", "grader_error"):
            self.close()
            return {"status": "died", "exit": "the worker sent garbage", "output": ""}, b""
        return decoded, result

    def _send(self, payload: bytes) -> None:
        self.process.stdin.write(struct.pack(">I", len(payload)) + payload)
        self.process.stdin.flush()

    def _receive(self, deadline: float) -> bytes | None:
        header = self._read_exact(4, deadline)
        if header is None:
            return None
        (size,) = struct.unpack(">I", header)
        if size > self.setup.limits.result_bytes + 2**20:
            return None
        return self._read_exact(size, deadline)

    def _read_exact(self, size: int, deadline: float) -> bytes | None:
        fd = self.process.stdout.fileno()
        chunks, remaining = [], size
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0, os.SEEK_END)
        size = self.stderr.tell()
        self.stderr.seek(max(0, size - 3000))
        return self.stderr.read().decode(errors="replace")


# -----------------------------------------------------------------------------
# The pool: a public and a hidden worker per lab, and each lab's import check


@dataclass
class ImportCheck:
    ok: bool
    message: str = ""


@dataclass
class Pool:
    """The workers of one grading run, started on first use and all killed at its end."""

    setup: Setup
    workers: dict[tuple[str, bool], Worker] = field(default_factory=dict)
    checks: dict[str, ImportCheck] = field(default_factory=dict)

    def worker(self, lab: str, *, hidden: bool) -> Worker:
        key = (lab, hidden)
        if key not in self.workers:
            for other in [k for k in self.workers if k[0] != lab]:
                self.workers.pop(other).close()  # tests run lab by lab: one lab's workers at a time
            worker = Worker(self.setup, lab, producer_files(lab, hidden=hidden), "hidden" if hidden else "public")
            worker.start()
            self.workers[key] = worker
        return self.workers[key]

    def import_check(self, lab: str) -> ImportCheck:
        """Import every module of the lab from the submission once, with a short limit (fail fast)."""
        if lab not in self.checks:
            self.checks[lab] = self._import_check(lab)
        return self.checks[lab]

    def _import_check(self, lab: str) -> ImportCheck:
        if not (self.setup.submission / lab / "__init__.py").is_file():
            return ImportCheck(False, f"the submission has no package {lab}/ (with an __init__.py): nothing to grade")
        limit = 30.0 * self.setup.time_limit_scale
        reply, blob = self.worker(lab, hidden=False).request({"op": "probe", "lab": lab}, b"", limit)
        try:
            outcome = _outcome(reply, blob, what=f"importing {lab}")
        except StudentTimeout:
            return ImportCheck(False, f"importing {lab} did not finish within {limit:.0f} s (a hang at import "
                                      "time?): every test of the lab gets zero")
        except StudentError as error:
            return ImportCheck(False, f"{lab} does not import, so every test of the lab gets zero:\n{error}")
        if outcome.get("missing"):
            return ImportCheck(False, f"the submission has no package {lab}/ (with an __init__.py): nothing to grade")
        if outcome.get("outside"):
            name, origin = outcome["outside"]
            return ImportCheck(False, f"{name} was imported from outside the submission ({origin})")
        return ImportCheck(True)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()


# -----------------------------------------------------------------------------
# The test's handle


class Student:
    """The `student` fixture: runs producers on the submission in a worker, within the test's time limit."""

    def __init__(self, pool: Pool, lab: str, *, hidden: bool, deadline: float, test_name: str):
        self._pool, self._lab, self._hidden, self._deadline, self._test = pool, lab, hidden, deadline, test_name

    def run(self, producer, /, *args, **kwargs):
        """Call `producer(*args, **kwargs)` in the worker and return its result (plain data).

        Raises:
            StudentError (also an instance of the raised built-in exception class, e.g. ValueError): the code raised.
            StudentCrash / StudentTimeout: it died, or ran past the test's time limit.
            GraderError: the producer is not a top-level function of a module the worker may import.
        """
        import torch

        __tracebackhide__ = True  # a failure's traceback shows the test's line, not the grader's plumbing
        name, qualname, path = _producer_address(producer)
        worker = self._pool.worker(self._lab, hidden=self._hidden)
        if worker.files.get(name) != path:
            where = "hidden/test_*.py" if "hidden" in path.parts else str(path.name)
            raise GraderError(f"{self._test}: producer {qualname} lives in {where}, which the worker may not see; "
                              "producers of hidden tests go in hidden/<name>.py (not a test file)")
        buffer = io.BytesIO()
        torch.save((args, kwargs), buffer)
        remaining = self._deadline - time.monotonic()
        reply, blob = worker.request({"op": "call", "module": name, "qualname": qualname}, buffer.getvalue(),
                                     remaining)
        return _outcome(reply, blob, what=qualname, show_output=not self._hidden)


def _outcome(reply: dict, blob: bytes, *, what: str, show_output: bool = True):
    """Turn a worker's reply into the producer's value, or the matching StudentError."""
    import torch

    __tracebackhide__ = True
    output = reply.get("output", "") if show_output else ""
    status = reply.get("status")
    if status == "grader_error":
        raise GraderError(str(reply.get("message", "")))
    if status == "timeout":
        raise StudentTimeout(f"{what}: the code did not finish within the test's time limit (a hang, a deadlock, "
                             "or far too slow?); everything it started was killed", output=output)
    if status == "died":
        raise StudentCrash(f"{what}: the code {reply.get('exit', 'died')} before returning a result "
                           "(sys.exit, os._exit, a crash, or a resource limit?)", output=output)
    try:
        result = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever it was, it is not a result we accept
        raise StudentCrash(f"{what}: the result could not be read as plain data ({type(error).__name__})",
                           output=output) from None
    if not isinstance(result, dict) or result.get("status") not in ("ok", "raised"):
        raise StudentCrash(f"{what}: the result was not in the worker's format", output=output)
    if result["status"] == "ok":
        return result.get("value")
    raise student_exception(result.get("error") or {}, output=output)


def student_exception(record: dict, *, output: str = "") -> StudentError:
    """A StudentError that is also an instance of the raised exception's nearest built-in class."""
    types = tuple(str(t) for t in record.get("types", ()) if isinstance(t, str))
    message = str(record.get("message", ""))
    detail = str(record.get("traceback", ""))
    importing = str(record.get("importing", ""))
    name = types[0] if types else "Exception"
    builtin = next((getattr(builtins, t) for t in types if isinstance(getattr(builtins, t, None), type)
                    and issubclass(getattr(builtins, t), Exception) and t != "Exception"), None)
    # a built-in class is named by the report itself ("ValueError: ..."); a submission's own class is named here
    text = message if builtin is not None and builtin.__name__ == name else f"{name}: {message}"
    if importing:
        text = f"importing {importing} raised {name}: {message}"
    text = text or name
    if detail:
        text += f"\nTraceback (in the submission):\n{detail}"
    if output.strip():
        text += f"\n--- output of the code under test ---\n{output.rstrip()}"
    if builtin is not None:
        try:
            cls = type(builtin.__name__, (StudentError, builtin), {"__module__": "builtins"})
            return cls(text, types=types, detail=detail, output=output)
        except TypeError:  # an incompatible layout (rare built-ins): the plain StudentError still says it all
            pass
    return StudentError(text if text.startswith(name) else f"{name}: {text}", types=types, detail=detail,
                        output=output)
