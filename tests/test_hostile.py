"""Hostile and broken submissions, graded through the real CLI with the jail required.

Each case gets exactly what a correct grader gives: forged passes score zero, a wrong solution scores its true score,
nothing is left running, and the kit's files are unchanged. Broken code goes into lab 01's `measure_plans` (used only by
test_saved_bytes_drop_as_predicted), so the other tests of test_memory.py must keep full marks. Cheats that try to turn
the stubs into passes are planted in the stubs.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from kit_helpers import KIT_ROOT, run_cli

MARK = "kit-hostile-fixture-sleeper"
BROKEN_LINE = '    baseline = saved_bytes(model, tokens, targets)\n'
SCALE = "0.15"  # 9 s a test: the reference's tests need well under a second each


def _grade(target: Path, tmp_path: Path, *tests: str, jail: str = "require", lab: str = "01") -> tuple[dict, float]:
    results = tmp_path / f"results-{time.monotonic_ns()}.json"
    start = time.monotonic()
    tests = tests or ("test_memory.py",)
    proc = run_cli("grade", lab, "--target", str(target), "--tests", *tests, "--json", str(results), "--jail", jail,
                   env={"SLM_TIME_LIMIT_SCALE": SCALE})
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"the grader itself failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(results.read_text()), elapsed


def _split(report: dict) -> tuple[list[dict], list[dict]]:
    broken = [t for t in report["tests"] if "saved_bytes_drop" in t["name"]]
    return broken, [t for t in report["tests"] if t not in broken]


def _leftover_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if MARK in cmdline and "pytest" not in cmdline and "sh -c" not in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


def _kit_fingerprint() -> str:
    digest = hashlib.sha256()
    for folder in ("labs", "reference", "autograder"):
        for path in sorted((KIT_ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def _jail_is_available():
    from autograder import jail

    if not jail.status().available:
        pytest.fail(f"these tests need the grading jail, which is unavailable here: {jail.status().reason}")


# -----------------------------------------------------------------------------
# Broken code costs only its own tests


HOSTILE = {
    "hang": ("while True:\n        pass\n", "did not finish within"),
    "segfault": ("import ctypes\n    ctypes.string_at(0)\n", "killed by signal SIGSEGV"),
    "os_exit": ("import os\n    os._exit(3)\n", "exited with code 3"),
    "sys_exit": ("import sys\n    sys.exit(0)\n", "SystemExit"),
    "huge_output": ("import sys\n    while True:\n        sys.stdout.write('x' * 1_000_000)\n", "output"),
    "huge_memory": ("x = bytearray(14 << 30)\n", "MemoryError"),
    "deadlock": (
        "import datetime, subprocess, sys\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{MARK}'])\n"
        "    import torch.distributed as dist\n"
        "    store = dist.TCPStore('127.0.0.1', 0, 2, is_master=True, wait_for_workers=False)\n"
        "    dist.init_process_group('gloo', store=store, rank=0, world_size=2, timeout=datetime.timedelta(hours=1))\n",
        "did not finish within",
    ),
    "fork_bomb": ("import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                  "            pass\n", "did not finish within"),
    "new_session_child": (
        "import subprocess, sys\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{MARK}'], "
        "start_new_session=True)\n    raise RuntimeError('left a child behind')\n", "left a child behind"),
    "double_fork_daemon_holding_pipes": (
        "import os, time, sys\n"
        "    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
        f"            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', '{MARK}'])\n"
        "        os._exit(0)\n"
        "    time.sleep(0.5)\n    raise RuntimeError('a daemon holds every inherited descriptor')\n",
        "a daemon holds"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_broken_code_costs_only_its_own_tests(kind, submission, tmp_path):
    body, expected_message = HOSTILE[kind]
    sub = submission(replace={"memory.py": (BROKEN_LINE, "    " + body + BROKEN_LINE)})
    before = _kit_fingerprint()
    report, elapsed = _grade(sub, tmp_path)
    broken, others = _split(report)
    assert broken and others
    for test in broken:
        assert test["score"] == 0, f"{kind}: {test['name']} scored {test['score']} despite the broken code"
        assert expected_message in test["output"], f"{kind}: unexpected message for {test['name']}:\n{test['output']}"
    for test in others:
        assert test["score"] == test["max_score"] > 0, f"{kind}: {test['name']} lost its points:\n{test['output']}"
    # two broken tests at 9 s each at most, plus start-up: well under a minute even on a loaded 2-core machine
    assert elapsed < 90, f"{kind}: grading took {elapsed:.0f} s"
    assert not _leftover_processes(), f"{kind}: processes left behind: {_leftover_processes()}"
    assert _kit_fingerprint() == before, f"{kind}: the kit's files changed"


def test_unconfined_fallback_still_kills_what_it_started(submission, tmp_path):
    """Without the jail (--jail off, a student's laptop), the worker is a child subreaper: a setsid daemon and a
    double-forked one are still found and killed, and a hang still costs only its tests."""
    body = ("import os, subprocess, sys\n"
            f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{MARK}'], "
            "start_new_session=True)\n"
            "    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
            f"            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', '{MARK}'])\n"
            "        os._exit(0)\n    while True:\n        pass\n")
    sub = submission(replace={"memory.py": (BROKEN_LINE, "    " + body + BROKEN_LINE)})
    report, elapsed = _grade(sub, tmp_path, jail="off")
    broken, others = _split(report)
    assert all(t["score"] == 0 and "did not finish within" in t["output"] for t in broken)
    assert all(t["score"] == t["max_score"] > 0 for t in others)
    assert not _leftover_processes(), f"processes left behind: {_leftover_processes()}"


# -----------------------------------------------------------------------------
# Cheats: forged passes score zero


def _stub_submission(tmp_path: Path, edits: dict[str, tuple[str, str]]) -> Path:
    """The stubs of lab 01, with `edits[file] = (old, new)` applied."""
    import shutil

    root = tmp_path / "cheat"
    shutil.copytree(KIT_ROOT / "labs" / "lab01_memory", root / "lab01_memory",
                    ignore=shutil.ignore_patterns("__pycache__", "*.ipynb", "*.md", "benchmark.py"))
    for name, (old, new) in edits.items():
        path = root / "lab01_memory" / name
        text = path.read_text()
        assert old in text, f"fixture edit does not apply to {name}: {old!r}"
        path.write_text(text.replace(old, new, 1))
    return root


# system folders a real search would skip, to finish within the test's time limit
SYSTEM_DIRS = "SYSTEM = ('usr', 'proc', 'sys', 'dev', 'lib', 'lib64', 'bin', 'sbin', 'etc', 'var', 'boot')\n"
PLAN_STUB = '    raise NotImplementedError("lab01: plan_segments is not implemented yet (lab01_memory/plans.py)")\n'

CHEATS = {
    # read the solution through the shared code's location, then run it
    "exec_reference_via_common_file": (
        "    import common, pathlib\n"
        "    root = pathlib.Path(common.__file__).resolve().parents[2]\n"
        "    namespace = {'__name__': 'lab01_memory.plans', '__package__': 'lab01_memory'}\n"
        "    exec((root / 'reference' / 'lab01_memory' / 'plans.py').read_text(), namespace)\n"
        "    return namespace['plan_segments'](num_blocks, config)\n"),
    # search the whole filesystem for any copy of the reference
    "search_the_filesystem_for_the_reference": (
        "    import os\n"
        "    for folder, dirs, files in os.walk('/'):\n"
        "        dirs[:] = [d for d in dirs if folder != '/' or d not in SYSTEM]\n"
        "        if folder.endswith(os.path.join('reference', 'lab01_memory')) and 'plans.py' in files:\n"
        "            namespace = {'__name__': 'lab01_memory.plans', '__package__': 'lab01_memory'}\n"
        "            exec(open(os.path.join(folder, 'plans.py')).read(), namespace)\n"
        "            return namespace['plan_segments'](num_blocks, config)\n"
        "    raise RuntimeError('no reference found')\n"),
    # write an all-passed payload to every descriptor the process holds
    "forge_results_on_every_descriptor": (
        "    import json, os\n"
        "    payload = json.dumps({'status': 'done', 'reports': [], 'outcome': 'passed'}).encode()\n"
        "    for fd in range(3, 1024):\n"
        "        try:\n"
        "            os.write(fd, len(payload).to_bytes(4, 'big') + payload)\n"
        "        except OSError:\n"
        "            pass\n"
        "    raise RuntimeError('forged')\n"),
    # find pytest's machinery on the stack or in memory and rewrite outcomes
    "hook_pytest_from_the_stack": (
        "    import gc, sys\n"
        "    for obj in gc.get_objects():\n"
        "        if type(obj).__name__ in ('Function', 'TestReport', 'Config'):\n"
        "            try:\n"
        "                obj.outcome = 'passed'\n"
        "            except Exception:\n"
        "                pass\n"
        "    frame = sys._getframe()\n"
        "    while frame is not None:\n"
        "        frame.f_globals.setdefault('__cheated__', True)\n"
        "        frame = frame.f_back\n"
        "    raise RuntimeError('no pytest here')\n"),
    # leave a daemon to rewrite the results file once pytest has written it
    "daemon_rewrites_the_results_file": (
        "    import os, time, glob, json\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        "            for _ in range(40):\n"
        "                time.sleep(0.25)\n"
        "                for path in glob.glob('/tmp/lab01_memory-*.json') + glob.glob('/tmp/**/results*.json'):\n"
        "                    try:\n"
        "                        data = json.load(open(path))\n"
        "                        for t in data.get('tests', []):\n"
        "                            t['outcome'], t['score'] = 'passed', t['max_score']\n"
        "                        json.dump(data, open(path, 'w'))\n"
        "                    except Exception:\n"
        "                        pass\n"
        "            os._exit(0)\n"
        "        os._exit(0)\n"
        "    raise RuntimeError('left a daemon')\n"),
    # print every hidden test the worker can find, hoping to see it in public feedback
    "leak_hidden_tests": (
        "    import os\n"
        "    for folder, dirs, files in os.walk('/'):\n"
        "        dirs[:] = [d for d in dirs if folder != '/' or d not in SYSTEM]\n"
        "        if os.path.basename(folder) == 'hidden':\n"
        "            for name in files:\n"
        "                try:\n"
        "                    print(open(os.path.join(folder, name)).read())\n"
        "                except OSError:\n"
        "                    pass\n"
        "    raise RuntimeError('leaked what I could')\n"),
    # overwrite the kit's shared comparison code for the next submission
    "poison_the_shared_code": (
        "    import common.testing, pathlib\n"
        "    path = pathlib.Path(common.testing.__file__)\n"
        "    path.write_text(path.read_text().replace('if (excess > 0).any():', 'if False:'))\n"
        "    raise RuntimeError('poisoned')\n"),
}


@pytest.mark.parametrize("kind", sorted(CHEATS))
def test_cheats_score_zero(kind, tmp_path):
    sub = _stub_submission(tmp_path, {"plans.py": (PLAN_STUB, "    " + SYSTEM_DIRS + CHEATS[kind])})
    before = _kit_fingerprint()
    report, _ = _grade(sub, tmp_path, "test_plans.py")
    assert report["max_score"] > 0
    assert report["score"] == 0, f"{kind}: the stubs scored {report['score']}: " + "; ".join(
        t["name"] for t in report["tests"] if t["score"] > 0)
    public = [t["output"] for t in report["tests"] if "after_published" not in t.get("visibility", "")]
    hidden_source = (KIT_ROOT / "autograder" / "lab01_memory" / "hidden" / "test_plans_hidden.py").read_text()
    assert not any("test_odd_depth_segments_match" in text or hidden_source[:200] in text for text in public), (
        f"{kind}: hidden test source reached public feedback")
    assert _kit_fingerprint() == before, f"{kind}: the kit's files changed"
    assert not _leftover_processes()


def test_a_package_init_that_redirects_to_the_reference(tmp_path):
    """A lab __init__ that puts reference/ first on sys.path and replaces itself in sys.modules finds no reference."""
    init = ("import sys, pathlib, importlib\n"
            "import common\n"
            "root = pathlib.Path(common.__file__).resolve().parents[2]\n"
            "sys.path.insert(0, str(root / 'reference'))\n"
            "for name in [n for n in sys.modules if n.startswith('lab01_memory')]:\n"
            "    del sys.modules[name]\n"
            "try:\n"
            "    sys.modules[__name__] = importlib.import_module('lab01_memory')\n"
            "except Exception:\n"
            "    pass\n")
    sub = _stub_submission(tmp_path, {"__init__.py": ('"""Lab 01', init + '"""Lab 01')})
    report, _ = _grade(sub, tmp_path, "test_plans.py")
    assert report["score"] == 0 and report["max_score"] > 0


def test_patching_the_comparison_code_cannot_pass_a_wrong_answer(submission, tmp_path):
    """Replacing check_close (its __code__ too) from student code cannot help: comparisons run in the grader. A wrong
    accumulation (normalised by the micro-batch count) scores exactly what it earns without the patch."""
    wrong = ('reduction="sum") / total_tokens', 'reduction="mean") / num_microbatches')
    patch = ("import common.testing\n"
             "common.testing.check_close.__code__ = (lambda *args, **kwargs: None).__code__\n"
             "common.testing.check_close = lambda *args, **kwargs: None\n"
             "import torch\ntorch.allclose = lambda *a, **k: True\n"
             "IGNORE_INDEX = -100")
    honest = submission(replace={"accumulation.py": wrong})
    honest_report, _ = _grade(honest, tmp_path, "test_accumulation.py")
    patched = submission(replace={"accumulation.py": wrong}, name="patched")
    path = patched / "lab01_memory" / "accumulation.py"
    path.write_text(path.read_text().replace("IGNORE_INDEX = -100", patch, 1))
    patched_report, _ = _grade(patched, tmp_path, "test_accumulation.py")
    assert 0 < honest_report["score"] < honest_report["max_score"]
    assert patched_report["score"] == honest_report["score"]


# -----------------------------------------------------------------------------
# Fail fast


@pytest.mark.parametrize("how", ["hang", "crash"])
def test_a_lab_that_does_not_import_is_graded_in_seconds(how, tmp_path):
    """A module that hangs (or raises) at import gets zero for every test of the lab, in seconds, not per test."""
    line = "import time\ntime.sleep(3600)\n" if how == "hang" else "raise ImportError('broken on purpose')\n"
    sub = _stub_submission(tmp_path, {"plans.py": ("import math\n", "import math\n" + line)})
    start = time.monotonic()
    results = tmp_path / "r.json"
    proc = run_cli("grade", "01", "--target", str(sub), "--json", str(results), "--jail", "require")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    graded = [t for t in report["tests"] if t["max_score"] > 0]
    assert graded and all(t["score"] == 0 for t in graded)
    expected = "did not finish within" if how == "hang" else "broken on purpose"
    assert all(expected in t["output"] for t in graded), graded[0]["output"]
    assert elapsed < 60, f"a lab that does not import took {elapsed:.0f} s to grade"


def test_missing_lab_is_reported_not_borrowed(tmp_path):
    """A submission without lab01_memory/ fails every test with a clear message (never falls through to reference/)."""
    (tmp_path / "empty").mkdir()
    results = tmp_path / "r.json"
    proc = run_cli("grade", "01", "--target", str(tmp_path / "empty"), "--tests", "test_plans.py", "--json", str(results))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    assert report["score"] == 0 and report["max_score"] > 0
    assert all("has no package lab01_memory" in t["output"] for t in report["tests"])


def test_the_worker_sees_no_kit_file_but_the_shared_code(tmp_path):
    """What the jail shows: the submission, common/, the producer modules; no reference/, hidden tests or grader."""
    probe = ("    import os\n"
             "    seen = sorted(os.listdir('/submission') + os.listdir('/kit') + os.listdir('/grader'))\n"
             "    kit = [os.path.exists(os.path.join('" + str(KIT_ROOT) + "', name)) for name in\n"
             "           ('reference', 'autograder', 'README.md', 'labs', 'tests')]\n"
             "    raise RuntimeError('SEEN ' + repr(seen) + ' ' + repr(any(kit)))\n")
    sub = _stub_submission(tmp_path, {"plans.py": (PLAN_STUB, probe)})
    report, _ = _grade(sub, tmp_path, "test_plans.py")
    message = next(t["output"] for t in report["tests"] if "SEEN" in t["output"])
    seen = message.split("SEEN ", 1)[1].splitlines()[0]
    assert "reference" not in seen and "hidden" not in seen and "runner" not in seen and "plugin" not in seen
    assert "test_plans" in seen and "common" in seen and "lab01_memory" in seen
    assert seen.endswith("False"), f"the kit's checkout is visible inside the jail: {seen}"
