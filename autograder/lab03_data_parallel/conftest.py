"""Helpers shared by lab 03's tests, in the grader. The student's code runs only in the worker, through producers
of workers.py that start the ranks themselves (common.launch.run_distributed inside the jail)."""

import pytest

from common.testing import check_close


def _compare_tensors(got: dict, expected: dict, *, name: str, inputs: str, dtype=None) -> None:
    """check_close every entry of `expected`; a None expected gradient (no gradient in the single-process run)
    allows None or zeros (DDP fills a parameter that got no gradient with zeros)."""
    if not isinstance(got, dict):
        raise AssertionError(f"{name}: expected a dict of tensors, got {type(got).__name__} ({inputs})")
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


@pytest.fixture(scope="session")
def _distributed_runs():
    return {}


@pytest.fixture
def shared_run(student, _distributed_runs):
    """student.run, remembered for the session: tests that check different things of one distributed run (which
    costs seconds of process start-up) share it. A run that failed fails every test that needs it, with its error."""

    def run(producer, *args, **kwargs):
        key = (producer.__module__, producer.__qualname__, repr(args), repr(sorted(kwargs.items())))
        if key not in _distributed_runs:
            try:
                _distributed_runs[key] = ("ok", student.run(producer, *args, **kwargs))
            except Exception as error:  # noqa: BLE001 - re-raised for every test that needs this run
                _distributed_runs[key] = ("error", error)
        status, value = _distributed_runs[key]
        if status == "error":
            raise value
        return value

    return run
