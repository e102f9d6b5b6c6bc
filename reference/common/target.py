"""The one switch between the student's code and the reference.

Every lab package has the same import name in both trees (`lab01_memory`), so which code runs is decided by which
directory is first on `sys.path`. `use_target` makes that choice for notebooks, slides and the autograder alike:

    from common.target import use_target
    use_target()              # $SLM_TARGET if set, else "labs": the student's stubs
    use_target("reference")   # the complete implementation (CI and lectures)
    use_target("/path/to/submission")   # a directory laid out like labs/

`check_lab` refuses to fall through: if the target lacks a lab, the autograder reports it instead of silently finding
the reference somewhere else on the path (reference/ is on the path when the kit is run without installing it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

# reference/common/target.py -> the kit's root
KIT_ROOT = Path(__file__).resolve().parents[2]
NAMED_TARGETS = {"labs": KIT_ROOT / "labs", "reference": KIT_ROOT / "reference"}


def resolve_target(target: str | os.PathLike | None = None) -> Path:
    """The directory that holds the lab packages for `target` ("labs", "reference" or a path)."""
    target = target if target is not None else os.environ.get("SLM_TARGET", "labs")
    path = NAMED_TARGETS.get(str(target), Path(target)).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"target {str(target)!r} is not a directory ({path})")
    return path


def use_target(target: str | os.PathLike | None = None) -> Path:
    """Put the target's lab packages first on sys.path and forget any lab modules imported from elsewhere."""
    path = resolve_target(target)
    # labs/ and reference/ hold packages of the same names: the target must come first
    for entry in list(sys.path):
        if entry and Path(entry).resolve() == path:
            sys.path.remove(entry)
    sys.path.insert(0, str(path))
    for name in list(sys.modules):
        if name.split(".")[0].startswith("lab") and name.split(".")[0][3:5].isdigit():
            del sys.modules[name]
    importlib.invalidate_caches()
    return path


def check_lab(lab: str, target_dir: Path) -> None:
    """Raise ImportError unless `lab` is importable from inside `target_dir` (no fall-through to another tree)."""
    spec = importlib.util.find_spec(lab)
    if spec is None or spec.origin is None:
        raise ImportError(f"{lab} was not found in {target_dir}: is the folder {lab}/ there?")
    if target_dir.resolve() not in Path(spec.origin).resolve().parents:
        raise ImportError(f"{lab} resolved to {spec.origin}, outside the target {target_dir}")
