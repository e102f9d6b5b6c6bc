"""grade-many grades a class folder on this machine and on a local Ray cluster, with the scores `grade` gives.

The class: alice (the reference, a folder), bob (the stubs), carol (the reference, a zip), dave (a hang in a function:
one test's time limit catches it), frank (a hang at import: the lab's import check catches it) and erin (no lab 01,
only a symbolic link to alice's, which is never followed: erin's lab is "missing"). A hostile submission costs only its
own row; grader failures are retried and then reported as "grader error", never a zero.
"""

import csv
import json
import subprocess
import sys
import zipfile

import pytest

from kit_helpers import KIT_ROOT, make_submission, run_cli

LAB = "lab01_memory"
SCALE = "0.2"  # 12 s a test, 6 s for the import check: the reference's tests need well under that
TESTS = ("test_memory.py", "test_checkpoint.py")  # two parts (and a hidden file) keep CI's time down
BROKEN_LINE = "    baseline = saved_bytes(model, tokens, targets)\n"
HANG = "    while True:\n        pass\n"


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class")
    work = tmp_path_factory.mktemp("work")
    make_submission(folder, name="alice")
    (folder / "bob").mkdir()
    subprocess.run(["cp", "-r", str(KIT_ROOT / "labs" / LAB), str(folder / "bob")], check=True)
    carol = make_submission(work, name="carol")
    with zipfile.ZipFile(folder / "carol.zip", "w") as archive:
        for path in (carol / LAB).glob("*.py"):
            archive.write(path, f"my-labs/{LAB}/{path.name}")
    make_submission(folder, name="dave", replace={"memory.py": (BROKEN_LINE, HANG + BROKEN_LINE)})
    frank = make_submission(folder, name="frank")
    with open(frank / LAB / "plans.py", "a") as handle:
        handle.write("\nwhile True:  # a hang at import\n    pass\n")
    (folder / "erin").mkdir()
    (folder / "erin" / "notes.txt").write_text("I ran out of time")
    (folder / "erin" / LAB).symlink_to(folder / "alice" / LAB)  # another student's code: never packed
    return folder


def _grade_many_cli(folder, out, *extra):
    return run_cli("grade-many", str(folder), "--labs", "01", "--out", str(out), "--time-limit-scale", SCALE,
                   "--jail", "require", "--progress", "lines", "--tests", *TESTS, *extra, timeout=600)


@pytest.fixture(scope="module")
def local_run(class_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("grades-local")
    proc = _grade_many_cli(class_folder, out, "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def one_by_one(class_folder, tmp_path_factory):
    """`python -m autograder grade` on bob (the stubs) and dave (a hang), both at once, as an instructor would one by
    one (alice, the reference, scores the maximum: test_local_run_grades_the_class checks it)."""
    out = tmp_path_factory.mktemp("grades-one")
    procs = {}
    for student in ("bob", "dave"):
        procs[student] = subprocess.Popen(
            [sys.executable, "-m", "autograder", "grade", "01", "--target", str(class_folder / student), "--json",
             str(out / f"{student}.json"), "--time-limit-scale", SCALE, "--jail", "require", "--progress", "off",
             "--tests", *TESTS],
            cwd=KIT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reports = {}
    for student, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
        reports[student] = json.loads((out / f"{student}.json").read_text())
    return reports


@pytest.fixture(scope="module")
def ray_cluster():
    from ray_helpers import start_local_ray

    ray = start_local_ray()
    yield
    if ray is not None:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(class_folder, ray_cluster, tmp_path_factory):
    from autograder import grade_many, runner

    out = tmp_path_factory.mktemp("grades-ray")
    options = runner.Options(tests=TESTS, time_limit_scale=float(SCALE), jail="require")
    records = grade_many.grade_many(class_folder, grade_many.Plan(labs=("01",), out=out, ray="auto", options=options))
    return out, records


def _csv(out):
    rows = list(csv.DictReader(open(out / "grades.csv")))
    return rows[0], {row["student"]: row for row in rows[1:]}


def _results(out, student):
    return json.loads((out / student / "results.json").read_text())


def test_local_run_grades_the_class(local_run, one_by_one):
    out, proc = local_run
    maxima, rows = _csv(out)
    assert sorted(rows) == ["alice", "bob", "carol", "dave", "erin", "frank"]
    full = float(maxima["total"])
    assert full > 0
    assert [rows[s][f"{LAB}:status"] for s in sorted(rows)] == ["graded"] * 4 + ["missing", "graded"]
    for student in ("alice", "carol"):
        assert float(rows[student]["total"]) == full
    for student in ("bob", "erin", "frank"):
        assert float(rows[student]["total"]) == 0
    # the hang in measure_plans costs its test alone
    dave = _results(out, "dave")
    lost = [t for t in dave["tests"] if t["score"] < t["max_score"]]
    assert lost and all("saved_bytes_drop" in t["name"] for t in lost), [t["name"] for t in lost]
    assert "did not finish within" in lost[0]["output"]
    assert 0 < float(rows["dave"]["total"]) < full
    assert "did not finish within" in json.dumps(_results(out, "frank"))
    assert "has no package" in _results(out, "erin")["tests"][0]["output"]
    # the same scores, test by test, as grading one by one
    for student, report in one_by_one.items():
        mine = _results(out, student)
        assert mine["score"] == report["score"] and mine["max_score"] == report["max_score"], student
        assert {t["name"]: t["score"] for t in mine["tests"]} == {t["name"]: t["score"] for t in report["tests"]}
        assert float(rows[student]["total"]) == report["score"]
    # a column per part, and the parts add up to the lab's total
    parts = [key for key in maxima if key.startswith(f"{LAB}:test_")]
    assert len(parts) == len(TESTS)
    for row in rows.values():
        assert sum(float(row[p]) for p in parts) == pytest.approx(float(row[f"{LAB}:total"]))
    # progress lines, the summary and its histogram
    assert "[grade-many] 1/6" in proc.stderr and "[grade-many] 6/6" in proc.stderr
    summary = (out / "summary.md").read_text()
    assert "5 graded, 1 missing, 0 grader error" in summary and f"{LAB}:test_memory.py" in summary
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_what_is_graded(class_folder, local_run):
    out, _ = local_run
    before = (out / "grades.csv").read_text()
    proc = _grade_many_cli(class_folder, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 task(s) to grade, 6 already graded" in proc.stderr
    assert (out / "grades.csv").read_text() == before


def test_ray_run_matches_the_local_run(local_run, ray_run):
    local_out, _ = local_run
    ray_out, records = ray_run
    assert _csv(ray_out) == _csv(local_out)
    for student in records:
        mine, theirs = _results(ray_out, student), _results(local_out, student)
        assert {t["name"]: t["score"] for t in mine["tests"]} == {t["name"]: t["score"] for t in theirs["tests"]}
        assert mine["extra_data"] == theirs["extra_data"]


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_grader_failures_are_retried_then_reported_never_zero(mode, tmp_path, request):
    """A task whose lab runs past the task's time limit fails every attempt: 'grader error', empty cells, no zero."""
    from autograder import grade_many, runner

    if mode == "ray":
        request.getfixturevalue("ray_cluster")
    folder = tmp_path / "class"
    make_submission(folder, name="alice")
    out = tmp_path / "out"
    options = runner.Options(tests=TESTS, time_limit_scale=float(SCALE), jail="require", lab_time_limit_s=0.5)
    plan = grade_many.Plan(labs=("01",), out=out, ray="auto" if mode == "ray" else None, retries=1, options=options)
    records = grade_many.grade_many(folder, plan)
    record = records["alice"][LAB]
    assert record["status"] == "grader error" and "did not finish within" in record["error"]
    if mode == "local":
        assert record["attempts"] == 2
    maxima, rows = _csv(out)
    assert rows["alice"][f"{LAB}:status"] == "grader error"
    assert rows["alice"][f"{LAB}:total"] == "" and rows["alice"]["max_score"] == "0"
    results = _results(out, "alice")
    assert results["extra_data"]["labs"][LAB] == "grader error"
    assert [t["max_score"] for t in results["tests"]] == [0.0] and "grader error" in results["tests"][0]["name"]
    assert "grader error" in (out / "summary.md").read_text()


def test_each_lab_asks_for_what_its_tests_need():
    from autograder import grade_many

    assert grade_many.lab_needs("lab01_memory") == grade_many.Needs(cpus=1, gpus=1)  # test_gpu.py's gpu marker
    assert grade_many.lab_needs("lab03_data_parallel") == grade_many.Needs(cpus=4, gpus=2)  # world 4, gpus(2)
    assert grade_many.lab_needs("lab06_lora").gpus == 0


def test_cli_help_and_one_line_errors(tmp_path):
    proc = run_cli("grade-many", "--help")
    assert proc.returncode == 0 and "--ray" in proc.stdout and "--retries" in proc.stdout
    (tmp_path / "empty").mkdir()
    proc = run_cli("grade-many", str(tmp_path / "empty"), "--labs", "01", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no submission" in proc.stderr and "Traceback" not in proc.stderr
