"""The one switch between the student's code and the reference.

Every lab package has the same import name in both trees (`lab01_memory`), so which code runs is decided by which
directory is first on `sys.path`. `use_target` makes that choice for notebooks, slides and the autograder alike:

    from common.target import use_target
    use_target()              # $SLM_TARGET if set, else the lab folder's parent, else "labs": the student's code
    use_target("reference")   # the complete implementation (CI and lectures)
    use_target("/path/to/submission")   # a directory laid out like labs/

`check_lab` refuses to fall through: if the target lacks a lab, the autograder reports it instead of silently finding
the reference somewhere else on the path (reference/ is on the path when the kit is run without installing it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

# labs/common/target.py -> the kit's root
KIT_ROOT = Path(__file__).resolve().parents[2]
NAMED_TARGETS = {"labs": KIT_ROOT / "labs", "reference": KIT_ROOT / "reference"}
LAB_PATTERN = re.compile(r"^lab(\d\d)_\w+$")  # a lab package's name: lab01_memory


def is_lab_name(name: str) -> bool:
    return LAB_PATTERN.match(name) is not None


def default_target() -> str:
    """$SLM_TARGET; else, from inside a lab folder (a notebook's working directory), the folder that holds it;
    else "labs". So a notebook under nbgrader runs the submission it sits in, and one in labs/ runs labs/."""
    if os.environ.get("SLM_TARGET"):
        return os.environ["SLM_TARGET"]
    here = Path.cwd()
    if is_lab_name(here.name) and (here / "__init__.py").exists():
        return str(here.parent)
    return "labs"


def resolve_target(target: str | os.PathLike | None = None) -> Path:
    """The directory that holds the lab packages for `target` ("labs", "reference" or a path)."""
    target = target if target is not None else default_target()
    path = NAMED_TARGETS.get(str(target), Path(target)).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"target {str(target)!r} is not a directory ({path})")
    return path


def use_target(target: str | os.PathLike | None = None) -> Path:
    """Put the target's lab packages first on sys.path and forget any lab modules imported from elsewhere."""
    path = resolve_target(target)
    # Triton reads this when a kernel is defined (at import): without a GPU, kernels run in its interpreter
    if not has_gpu_device():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # labs/ and reference/ hold packages of the same names: the target must come first
    for entry in list(sys.path):
        if entry and Path(entry).resolve() == path:
            sys.path.remove(entry)
    sys.path.insert(0, str(path))
    for name in list(sys.modules):
        if is_lab_name(name.split(".")[0]):
            del sys.modules[name]
    importlib.invalidate_caches()
    return path


def check_lab(lab: str, target_dir: Path) -> None:
    """Raise ImportError unless `lab` is importable from inside `target_dir` (no fall-through to another tree)."""
    spec = importlib.util.find_spec(lab)  # locates the package without running its code
    if spec is None or spec.origin is None:
        raise ImportError(f"the target {target_dir} has no package {lab}/ (with an __init__.py)")
    if target_dir.resolve() not in Path(spec.origin).resolve().parents:
        raise ImportError(f"the target {target_dir} has no package {lab}/: it resolved to {spec.origin}, "
                          "outside the target")


def presenter_target(lab: str) -> str:
    """For lecture decks: $SLM_TARGET, else the reference when this checkout has it (the student release does not)."""
    if os.environ.get("SLM_TARGET"):
        return os.environ["SLM_TARGET"]
    return "reference" if (NAMED_TARGETS["reference"] / lab / "__init__.py").exists() else "labs"


def has_gpu_device() -> bool:
    """Whether an NVIDIA GPU is present, without importing torch or initialising CUDA."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()
