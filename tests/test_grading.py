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
    # parametrized tests share a test's points (thirds, eighths): the total is rounded, the sum is not
    assert sum(t["max_score"] for t in report["tests"]) == pytest.approx(report["max_score"], abs=1e-6)


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


def test_zip_submission_is_graded(tmp_path):
    """A zip whose single top folder holds the lab (as students download and re-zip it) grades like a directory."""
    import zipfile

    from kit_helpers import KIT_ROOT

    archive = tmp_path / "submission.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (KIT_ROOT / "reference" / "lab01_memory").glob("*.py"):
            zf.write(path, f"my-labs/lab01_memory/{path.name}")
    out = tmp_path / "r.json"
    proc = run_cli("grade", "01", "--target", str(archive), "--tests", "test_plans.py", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["score"] == report["max_score"] > 0

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.py", "print('outside')")
    proc = run_cli("grade", "01", "--target", str(evil))
    assert proc.returncode == 2 and "unsafe path" in proc.stderr


def test_bad_targets_get_one_line_errors(tmp_path):
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    for target, expected in ((str(corrupt), "not a valid zip"), (str(tmp_path / "missing.zip"), "no such zip"),
                             (str(tmp_path / "nowhere"), "neither"),
                             ("reference/lab01_memory", "is a lab folder; give the folder that holds it")):
        proc = run_cli("grade", "01", "--target", target)
        assert proc.returncode == 2, (target, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr, (target, proc.stderr)


def test_report_groups_by_part_marks_hidden_tests_and_cleans_up(tmp_path):
    """The table groups tests by lab and part with subtotals, names parametrized cases by their parameters, marks
    hidden tests, shows progress while grading, and removes the unzipped submission afterwards."""
    import glob
    import zipfile

    from kit_helpers import KIT_ROOT

    archive = tmp_path / "submission.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (KIT_ROOT / "labs" / "lab01_memory").glob("*.py"):
            zf.write(path, f"lab01_memory/{path.name}")
    before = set(glob.glob("/tmp/submission-*"))
    proc = run_cli("grade", "01", "--target", str(archive), "--tests", "test_plans.py", "--progress", "lines")
    assert proc.returncode == 0, proc.stderr
    assert set(glob.glob("/tmp/submission-*")) == before, "the unzipped submission was left behind"
    table = proc.stdout
    assert "  test_plans.py" in table and " / 17" in table  # the part and its subtotal (public + hidden)
    assert "[hidden]" in table
    assert "test_sqrt_plan_rounds_to_nearest (num_blocks=7)" in table
    assert "[7-" not in table and "plan0" not in table, "pytest's parameter ids reached the table"
    assert str(archive) in table.splitlines()[0]
    assert "[lab01_memory] 1/" in proc.stderr and "test_plans.py ::" in proc.stderr, "no progress lines"
