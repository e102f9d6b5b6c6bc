"""The kit's autograder: `python -m autograder grade LAB|all --target labs|reference|PATH`.

See autograder/runner.py (scorecards), autograder/plugin.py (one forked, time-limited process per test),
autograder/release.py (stubs, student release, nbgrader course) and autograder/doctor.py.
"""

import sys
from pathlib import Path

# Without `pip install -e .`, `common` is found in labs/ (appended last: the grader never imports a lab from it).
_SHARED = str(Path(__file__).resolve().parent.parent / "labs")
try:
    import common  # noqa: F401
except ImportError:
    sys.path.append(_SHARED)
