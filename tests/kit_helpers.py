"""Helpers for the kit's own tests (tests/), which check the kit itself: the reference scores full marks, the
stubs score zero, the release leaks nothing, notebooks run, nbgrader grades, and hostile submissions are contained."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

KIT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run_cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m autograder ARGS` from the kit's root, as a user would."""
    return subprocess.run([sys.executable, "-m", "autograder", *args], cwd=KIT_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def make_submission(tmp_path: Path, lab: str = "lab01_memory", replace: dict[str, tuple[str, str]] | None = None,
                    name: str = "submission") -> Path:
    """A submission laid out like labs/: the reference code of `lab`, with `replace[file] = (old, new)` edits."""
    root = tmp_path / name
    shutil.copytree(KIT_ROOT / "reference" / lab, root / lab, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name, (old, new) in (replace or {}).items():
        path = root / lab / name
        text = path.read_text()
        assert old in text, f"fixture edit does not apply to {name}: {old!r}"
        path.write_text(text.replace(old, new, 1))
    return root
