"""The grading worker: the one process tree in which student code runs.

The grader (the pytest process that decides verdicts) starts this script inside the jail (autograder/jail.py) and
talks to it over stdin/stdout in length-prefixed frames. The worker is a "zygote": it imports torch and the test's
producer modules once, never the student's code, then forks one child per request:

    grader -> worker   {"op": "call", "module": "test_checkpoint", "qualname": "checkpoint_gradients",
                        "timeout_s": 60}  + torch.save((args, kwargs))
    worker -> grader   {"status": "done"|"died"|"timeout"|"grader_error", "output": ..., ...}  + result bytes

The child puts the submission on sys.path, calls `producer(*args, **kwargs)` and writes
`torch.save({"status": "ok", "value": result})` (or the exception, as text) to a private file. The worker sends those
bytes back without reading them; the grader loads them with `torch.load(weights_only=True)`, which builds tensors,
numbers, strings and containers and never runs code. So nothing a child does can reach the grader except data that
the grader then checks.

Each child runs in its own session, with limits on memory, open files, file size and CPU time, and its output goes
to a capped file. When it returns, dies or runs out of time, the worker kills every other process in the jail's PID
namespace (or, unjailed, every descendant, as a child subreaper), so nothing a child started outlives its request.

This file is mounted into the jail alone: it imports nothing from the autograder package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import io
import json
import os
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback

LAB_MODULE = re.compile(r"^lab\d\d_\w+$")
OUTPUT_TAIL_BYTES = 4000


# -----------------------------------------------------------------------------
# Frames


def read_frame(stream) -> bytes | None:
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    chunks, remaining = [], size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_frame(stream, payload: bytes) -> None:
    stream.write(struct.pack(">I", len(payload)) + payload)
    stream.flush()


# -----------------------------------------------------------------------------
# The zygote


class _NoLabImports(importlib.abc.MetaPathFinder):
    """In the worker itself, importing a lab package is an authoring error: only forked children run student code."""

    def find_spec(self, name, path=None, target=None):
        if LAB_MODULE.match(name.split(".")[0]):
            raise ImportError(f"a producer module imported {name} at module level; import the lab inside the "
                              "producer function, so that only the forked child runs student code")
        return None


def main() -> None:
    control_in = os.fdopen(0, "rb", buffering=0)
    control_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print in the worker must never corrupt the protocol
    config = json.loads(read_frame(control_in))
    sys.path[:0] = config["sys_path"]
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # CUDA stays uninitialised until a child uses it
    if not config["pid_namespace"] and sys.platform.startswith("linux"):
        _become_subreaper()
    blocker = _NoLabImports()
    sys.meta_path.insert(0, blocker)
    try:
        import torch  # noqa: F401  (every child needs it: import once, before forking)

        for name in config.get("preload", []):
            importlib.import_module(name)
    except BaseException:
        write_frame(control_out, json.dumps({"ready": False, "error": traceback.format_exc()}).encode())
        return
    write_frame(control_out, json.dumps({"ready": True, "pid": os.getpid()}).encode())
    scratch = tempfile.mkdtemp(prefix="calls-")
    count = 0
    while True:
        header = read_frame(control_in)
        if header is None:
            return
        request = json.loads(header)
        blob = read_frame(control_in) or b""
        count += 1
        reply, result = _serve(request, blob, config, blocker, os.path.join(scratch, f"call-{count}"),
                               (control_in.fileno(), control_out.fileno()))
        write_frame(control_out, json.dumps(reply).encode())
        write_frame(control_out, result)


def _serve(request: dict, blob: bytes, config: dict, blocker, call_dir: str, control_fds) -> tuple[dict, bytes]:
    """Fork a child for one request, wait for it within its time limit, clean up, and describe what happened."""
    os.makedirs(call_dir)
    if request["op"] == "call":
        try:  # the producer module is grader code: import it here, once, so every later child inherits it
            importlib.import_module(request["module"])
        except BaseException:
            return {"status": "grader_error", "message": "could not import the producer module "
                    f"{request['module']}:\n{traceback.format_exc()}"}, b""
    result_path = os.path.join(call_dir, "result.pt")
    output_path = os.path.join(call_dir, "output.txt")
    timeout_s = float(request["timeout_s"])
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(request, blob, config, blocker, call_dir, result_path, output_path, control_fds)
    timed_out, status = _wait(pid, start + timeout_s)
    if status is None:
        _signal_group(pid)
        _, status = os.waitpid(pid, 0)
    _kill_everything_but_me(pid, config["pid_namespace"])
    elapsed = time.monotonic() - start
    reply = {"elapsed_s": round(elapsed, 3), "output": _tail(output_path), "exit": _describe(status)}
    if timed_out:
        reply["status"] = "timeout"
        return reply, b""
    if os.path.exists(result_path):
        with open(result_path, "rb") as handle:
            result = handle.read(config["limits"]["result_bytes"] + 1)
        if len(result) > config["limits"]["result_bytes"]:
            reply["status"] = "died"
            reply["exit"] = f"returned more than {config['limits']['result_bytes'] >> 20} MiB of results"
            return reply, b""
        reply["status"] = "done"
        return reply, result
    reply["status"] = "died"
    return reply, b""


def _wait(pid: int, deadline: float) -> tuple[bool, int | None]:
    pause = 0.002
    while True:
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited:
            return False, status
        if time.monotonic() > deadline:
            return True, None
        time.sleep(pause)
        pause = min(pause * 1.5, 0.02)


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - OUTPUT_TAIL_BYTES))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return ("[...]\n" if size > OUTPUT_TAIL_BYTES else "") + text


def _describe(status: int | None) -> str:
    if status is None:
        return "killed at the time limit"
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum == signal.SIGXFSZ:
            return "wrote more output than allowed and was stopped"
        if signum == signal.SIGXCPU:
            return "used more CPU time than allowed and was stopped"
        return f"was killed by signal {signal.Signals(signum).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


# -----------------------------------------------------------------------------
# Cleaning up: nothing a child started survives its request


def _become_subreaper() -> None:
    """Orphans of our children get re-parented to us (not to init), so we can find and kill them (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _processes() -> dict[int, int]:
    """pid -> parent pid, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                table[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _signal_group(pid: int) -> None:
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_everything_but_me(child: int, pid_namespace: bool) -> None:
    """SIGKILL the child's group, then every other live process of the jail (or our descendants), until none."""
    _signal_group(child)
    if not os.path.isdir("/proc"):
        return
    me = os.getpid()
    for _ in range(200):  # a fork bomb may race the first rounds
        table = _processes()
        if pid_namespace:
            # the jail's own PID namespace: pid 1 is bwrap's init; everything else but us is a child's doing
            victims = [pid for pid in table if pid not in (1, me)]
        else:
            victims = [pid for pid in table if pid != me and _descends_from(pid, me, table)]
        victims = [pid for pid in victims if _is_alive(pid)]
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _reap()
        time.sleep(0.005)
    _reap()


def _descends_from(pid: int, ancestor: int, table: dict[int, int]) -> bool:
    seen = set()
    while pid in table and pid not in seen:
        seen.add(pid)
        pid = table[pid]
        if pid == ancestor:
            return True
    return False


def _is_alive(pid: int) -> bool:
    """Running or sleeping, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _reap() -> None:
    """Collect every zombie we are the parent (or subreaper) of; the request's child was waited for already."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# -----------------------------------------------------------------------------
# The child: the only place student code runs


def _child(request, blob, config, blocker, call_dir, result_path, output_path, control_fds) -> None:
    code = 0
    try:
        os.setsid()
        for fd in control_fds:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        _set_limits(config["limits"], float(request["timeout_s"]))
        os.chdir(call_dir)
        sys.meta_path.remove(blocker)
        outcome = _run(request, blob, config)
        _save(outcome, result_path, config["limits"]["result_bytes"])
    except BaseException:  # the worker's own failure to run the request: report it as such
        code = 70
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def _set_limits(limits: dict, timeout_s: float) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; we want the writer stopped, not EFBIG
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # soft limit for the student's files; the hard limit leaves room for the result file the worker writes last
    result_room = max(limits["file_bytes"], limits["result_bytes"] + 2**20)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], result_room))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    cpu_s = int(timeout_s * max(2, os.cpu_count() or 1) + 30)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    if limits.get("memory_bytes"):
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    if limits.get("processes"):
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))


def _run(request: dict, blob: bytes, config: dict) -> dict:
    import torch

    if request["op"] == "probe":
        return _probe(request["lab"], config["submission"])
    args, kwargs = torch.load(io.BytesIO(blob), weights_only=True)
    module = importlib.import_module(request["module"])
    producer = module
    for part in request["qualname"].split("."):
        producer = getattr(producer, part)
    try:
        value = producer(*args, **kwargs)
    except BaseException as error:  # SystemExit and KeyboardInterrupt too: a submission's exit is its failure
        return {"status": "raised", "error": _exception_record(error, config["submission"])}
    return {"status": "ok", "value": _portable(value)}


def _probe(lab: str, submission: str) -> dict:
    """Import every module of the lab package from the submission: does the submission load at all?"""
    root = os.path.join(submission, lab)
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        return {"status": "ok", "value": {"missing": True, "modules": []}}
    names = []
    for folder, _, files in sorted(os.walk(root)):
        package = os.path.relpath(folder, submission).replace(os.sep, ".")
        if not os.path.isfile(os.path.join(folder, "__init__.py")):
            continue
        for file in sorted(files):
            if file.endswith(".py"):
                names.append(package if file == "__init__.py" else f"{package}.{file[:-3]}")
    imported = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except BaseException as error:
            return {"status": "raised", "error": _exception_record(error, submission, importing=name)}
        origin = os.path.realpath(getattr(module, "__file__", "") or "")
        if not origin.startswith(os.path.realpath(submission) + os.sep):
            return {"status": "ok", "value": {"missing": False, "modules": imported, "outside": [name, origin]}}
        imported.append(name)
    return {"status": "ok", "value": {"missing": False, "modules": imported}}


def _portable(value):
    """Results as plain data: tensors detached, contiguous and on the CPU; containers rebuilt as plain ones."""
    import torch

    if isinstance(value, torch.Tensor):
        plain = value.detach()
        if type(plain) is not torch.Tensor:
            plain = plain.as_subclass(torch.Tensor)  # a subclass would not load on the grader's side
        return plain.to("cpu").contiguous().clone()
    if isinstance(value, dict):
        return {(_portable(k) if not isinstance(k, (str, int, float, bool)) else k): _portable(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_portable(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.Size,
                                           torch.device)):
        return value
    raise TypeError(f"the producer returned a {type(value).__name__}, which cannot travel to the grader "
                    "(return tensors, numbers, strings, or lists/tuples/dicts of them)")


def _exception_record(error: BaseException, submission: str, importing: str | None = None) -> dict:
    """An exception as text: its class hierarchy, message, and the traceback frames in the submission."""
    try:
        message = str(error)
    except BaseException:
        message = "<the exception's message could not be printed>"
    frames = traceback.extract_tb(error.__traceback__)
    shown = []
    prefix = os.path.realpath(submission) + os.sep
    for frame in frames:
        path = os.path.realpath(frame.filename)
        if path.startswith(prefix):
            shown.append(f'  File "{path[len(prefix):]}", line {frame.lineno}, in {frame.name}\n'
                         f'    {(frame.line or "").strip()}')
    return {
        "types": [cls.__name__ for cls in type(error).__mro__],
        "message": message[:4000],
        "traceback": "\n".join(shown[-12:]),
        "importing": importing or "",
    }


def _save(outcome: dict, path: str, limit: int) -> None:
    """Write the outcome for the grader; one that cannot be serialised or is over `limit` bytes becomes an error."""
    import torch

    def refusal(message: str) -> bytes:
        buffer = io.BytesIO()
        torch.save({"status": "raised", "error": {"types": ["TypeError", "Exception", "BaseException"],
                                                  "message": message, "traceback": "", "importing": ""}}, buffer)
        return buffer.getvalue()

    buffer = io.BytesIO()
    try:
        torch.save(outcome, buffer)
        data = buffer.getvalue()
    except BaseException as error:
        data = refusal(f"the result could not be serialised: {error}")
    if len(data) > limit:
        data = refusal(f"the result is {len(data) >> 20} MiB, more than the {limit >> 20} MiB a test may return")
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # the student's file limit does not bound the result
    with open(path, "wb") as handle:
        handle.write(data)


if __name__ == "__main__":
    main()
