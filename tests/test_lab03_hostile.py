"""Lab 03's ban on torch collectives cannot be dodged by capturing a collective at import time (issue 8).

The ring collectives must be built from point-to-point messages. Each rank installs the ban before it imports the
submission (autograder/lab03_data_parallel/workers.py, guard_collectives), so a module that keeps a reference to
`dist.all_reduce`, to `ProcessGroup.allreduce` or to the function in `distributed_c10d` keeps a reference to the ban.
Each case below is the reference with `ring_all_reduce` replaced by a call to a collective captured at import: it must
lose every point of the ring tests (values and point-to-point volume alike) and keep the cost model's, with a message
that says why, through the real CLI with the jail required.
"""

import json
import time
from pathlib import Path

import pytest

from kit_helpers import run_cli

LAB = "lab03_data_parallel"
IMPORTS = "import torch.distributed as dist\n"
FIRST_LINE = "    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()\n"
CHEAT_BODY = ("    {call}\n"
              "    if op == 'avg':\n"
              "        tensor.div_(world_size)\n"
              "    return tensor\n")

# name -> (what the module captures at import, how ring_all_reduce then calls it)
CAPTURES = {
    "dist.all_reduce": ("_captured = dist.all_reduce\n", "_captured(tensor, group=group)"),
    "distributed_c10d.all_reduce": ("from torch.distributed.distributed_c10d import all_reduce as _captured\n",
                                    "_captured(tensor, group=group)"),
    "ProcessGroup.allreduce": (
        "_captured = dist.ProcessGroup.allreduce\n",
        "_captured(group or dist.distributed_c10d._get_default_group(), [tensor]).wait()"),
    "Backend.allreduce": (
        "import torch._C._distributed_c10d as _c10d\n_captured = _c10d.Backend.allreduce\n",
        "_captured((group or dist.distributed_c10d._get_default_group())._get_backend(tensor.device), "
        "[tensor]).wait()"),
}


@pytest.fixture(scope="module", autouse=True)
def _jail_is_available():
    from autograder import jail

    if not jail.status().available:
        pytest.fail(f"these tests need the grading jail, which is unavailable here: {jail.status().reason}")


def _grade(target: Path, tmp_path: Path) -> dict:
    results = tmp_path / f"results-{time.monotonic_ns()}.json"
    proc = run_cli("grade", "03", "--target", str(target), "--tests", "test_collectives.py", "--public-only",
                   "--json", str(results), "--jail", "require")
    assert proc.returncode == 0, f"the grader itself failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(results.read_text())


@pytest.mark.parametrize("capture", sorted(CAPTURES))
def test_a_collective_captured_at_import_is_still_banned(capture, submission, tmp_path):
    at_import, call = CAPTURES[capture]
    sub = submission(lab=LAB, replace={"collectives.py": (FIRST_LINE, CHEAT_BODY.format(call=call) + FIRST_LINE)})
    path = sub / LAB / "collectives.py"
    path.write_text(path.read_text().replace(IMPORTS, IMPORTS + at_import, 1))
    report = _grade(sub, tmp_path)
    ring = [t for t in report["tests"] if "ring" in t["name"]]
    others = [t for t in report["tests"] if t not in ring]
    assert ring and others
    for test in ring:
        assert test["score"] == 0, f"{capture}: {test['name']} scored {test['score']} with a captured collective"
        assert "point-to-point" in test["output"], f"{capture}: {test['name']} fails for another reason:\n" \
                                                   f"{test['output'][:2000]}"
    for test in others:
        assert test["score"] == test["max_score"] > 0, f"{capture}: {test['name']} lost its points:\n{test['output']}"
