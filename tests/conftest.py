"""The kit's own tests check the kit itself: the reference scores full marks, the stubs score zero, the release leaks
nothing, notebooks run, nbgrader grades, and hostile submissions are contained. Helpers live in kit_helpers.py."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import kit_helpers (pytest runs in importlib mode)

from kit_helpers import make_submission  # noqa: E402


@pytest.fixture
def submission(tmp_path):
    return lambda **kwargs: make_submission(tmp_path, **kwargs)
