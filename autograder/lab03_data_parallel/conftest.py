"""Helpers shared by lab 03's tests. Nothing here imports the code under test: the tests import it inside each test
(and the workers inside each spawned rank), so a broken submission cannot break collection."""

import pytest
import torch

from common.testing import check_close


def _compare_tensors(got: dict, expected: dict, *, name: str, inputs: str, dtype=None) -> None:
    """check_close every entry of `expected`; a None expected gradient (no gradient in the single-process run)
    allows None or zeros (DDP fills a parameter that got no gradient with zeros)."""
    for key, want in expected.items():
        if key not in got:
            raise AssertionError(f"{name}: missing {key} ({inputs})")
        have = got[key]
        if want is None:
            if have is not None and bool(have.abs().max() > 0):
                raise AssertionError(f"{name}: {key} should have no gradient (or zeros), got max |g| = "
                                     f"{have.abs().max().item():.3g} ({inputs})")
            continue
        if have is None:
            raise AssertionError(f"{name}: {key} has no gradient, expected one ({inputs})")
        check_close(have, want, name=f"{name} ({key})", inputs=inputs, dtype=dtype)


@pytest.fixture
def compare_tensors():
    return _compare_tensors


@pytest.fixture
def distributed():
    """run_distributed, for the workers of workers.py (imported here, inside the forked test process)."""
    from common.launch import run_distributed

    return run_distributed

