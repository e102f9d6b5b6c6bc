"""Points, read from the tests themselves: the one source for notebook cells, READMEs and the scorecard's maxima.

Each graded test carries `@pytest.mark.points(n)`; a parametrized test's n is shared by its cases. A lab's *part* is
one public test file, `test_<part>.py`, graded together with its hidden tests, `hidden/test_<part>_hidden*.py`.

    part_points("lab01_memory", "test_plans.py")   # Points(public=15.0, hidden=3.0)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

AUTOGRADER_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Points:
    public: float
    hidden: float

    @property
    def total(self) -> float:
        return self.public + self.hidden


def file_points(path: Path) -> dict[str, float]:
    """test function name -> its points, from the decorators of one test file (no import: nothing runs)."""
    points = {}
    for node in ast.parse(path.read_text()).body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        for decorator in node.decorator_list:
            if (isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.points"
                    and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                points[node.name] = float(decorator.args[0].value)
    return points


def part_files(lab: str, part: str) -> tuple[Path, list[Path]]:
    """(the public test file, its hidden test files) of a part, e.g. part "test_plans.py"."""
    lab_dir = AUTOGRADER_DIR / lab
    public = lab_dir / part
    if not public.is_file():
        raise FileNotFoundError(f"{lab}: no test file {part}")
    return public, sorted((lab_dir / "hidden").glob(f"{Path(part).stem}_hidden*.py"))


def part_points(lab: str, part: str) -> Points:
    public, hidden = part_files(lab, part)
    return Points(public=sum(file_points(public).values()),
                  hidden=sum(v for path in hidden for v in file_points(path).values()))


def lab_parts(lab: str) -> dict[str, Points]:
    """Every part of a lab (its public test files, in name order) and its points."""
    return {path.name: part_points(lab, path.name) for path in sorted((AUTOGRADER_DIR / lab).glob("test_*.py"))}
