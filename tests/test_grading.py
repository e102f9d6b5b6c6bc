"""The reference scores full marks and the stubs score zero, on every lab, through the real CLI."""

import csv
import json

import pytest

from kit_helpers import run_cli


@pytest.fixture(scope="module")
def reference_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = run_cli("grade", "all", "--target", "reference", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), list(csv.DictReader(open(out / "r.csv"))), proc.stdout


@pytest.fixture(scope="module")
def stub_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubs")
    proc = run_cli("grade", "all", "--target", "labs", "--json", str(out / "r.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text())


def test_reference_gets_full_marks(reference_report):
    report, rows, table = reference_report
    failed = [t for t in report["tests"] if t["score"] < t["max_score"]]
    assert not failed, "reference failed: " + "\n".join(f"{t['name']}: {t['output'][:500]}" for t in failed)
    assert report["score"] == report["max_score"] > 0
    assert "TOTAL" in table


def test_not_graded_tests_count_neither_way(reference_report):
    report, rows, _ = reference_report
    not_graded = [r for r in rows if r["outcome"] == "not_graded"]
    for row in not_graded:
        assert row["message"].startswith("not graded here")
    entries = [t for t in report["tests"] if t["output"].startswith("not graded here")]
    assert all(t["score"] == 0 and t["max_score"] == 0 for t in entries)
    assert sum(t["max_score"] for t in report["tests"]) == report["max_score"]


def test_gradescope_format(reference_report):
    report, _, _ = reference_report
    assert set(report) >= {"score", "max_score", "tests"}
    for test in report["tests"]:
        assert set(test) >= {"name", "score", "max_score", "output"}


def test_stubs_score_zero_with_messages_naming_the_function(stub_report):
    assert stub_report["score"] == 0 and stub_report["max_score"] > 0
    for test in stub_report["tests"]:
        if test["max_score"] == 0:
            continue  # not graded here
        assert "is not implemented yet" in test["output"], f"{test['name']}: unhelpful failure:\n{test['output'][:800]}"


def test_cli_errors_exit_nonzero():
    proc = run_cli("grade", "99", "--target", "reference")
    assert proc.returncode == 2 and "unknown lab" in proc.stderr


def test_doctor_reports_the_machine():
    proc = run_cli("doctor")
    assert proc.returncode == 0
    for word in ("CPU cores", "GPUs", "triton", "gloo"):
        assert word in proc.stdout
