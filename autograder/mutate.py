"""Mutation testing of a lab's graded tests: do they catch the bugs students really make?

    python -m autograder mutate 01 [--budget 60] [--jobs 2] [--json mutants.json]

Each *mutant* is the reference with one small bug written into a solution region (only there: the code students
write). Every mutant is graded like a submission, with the usual isolation, stopping at the first lost point. A
mutant that loses a point is *killed*; one that still gets full marks *survived*, and its diff is printed: a bug the
tests let through. The kill rate is killed / (mutants - known equivalent mutants).

Operators (the bugs students make, in miniature):
    arithmetic   + <-> -, * <-> /, // <-> /, ** -> *, % -> //
    comparison   < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in
    boolean      and <-> or, `not x` -> x
    constant     an integer n -> n + 1 and n - 1 (off by one)
    statement    a statement (a call, an assignment) dropped, i.e. replaced by `pass`
    arguments    the first two positional arguments of a call swapped (not of calls where they commute: max, add,
                 transpose, ...)
    return       `return x` -> `return None`

Why not mutmut or cosmic-ray: both mutate whole modules and run the test suite themselves (mutmut through trampolines
inside the project, cosmic-ray through its own session database and execution engines). Here a mutant must touch only
the solution regions, and must be graded through the autograder (jailed worker, points, hidden tests), so a small
generator over Python's own `ast`, editing only the mutated node's source span, is simpler than bending either.

Equivalent mutants (a change no test can detect, e.g. `<` -> `<=` where equality never happens) are listed, each with
a one-line reason, in `autograder/<lab>/hidden/equivalent_mutants.json` (hidden: it quotes solution code), keyed by
the mutant's id as printed in the table. The same file lists, as "gpu_only", mutants of code that runs only on a GPU
(the CUDA RNG streams, say): they are graded where a GPU is present and reported apart, never counted as killed,
on a machine without one.
"""

from __future__ import annotations

import ast
import concurrent.futures
import difflib
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from autograder import runner
from autograder.release import BEGIN, END
from common.target import has_gpu_device

REFERENCE_DIR = runner.KIT_ROOT / "reference"
MARKER_BEGIN, MARKER_END = BEGIN, END  # the solution markers, spelled once in release.py

ARITHMETIC = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
              ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
COMPARISON = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
              ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BOOLEAN = {ast.And: ast.Or, ast.Or: ast.And}
# calls whose first two arguments commute: swapping them would only make equivalent mutants
SYMMETRIC_CALLS = {"transpose", "swapaxes", "swapdims", "max", "min", "maximum", "minimum", "add", "mul", "hypot",
                   "gcd", "lcm", "isclose", "allclose", "equal", "eq", "ne"}


@dataclass(frozen=True)
class Mutant:
    file: str  # relative to the lab folder
    line: int
    col: int
    operator: str
    before: str  # the source of the node, as written
    after: str  # what replaces it

    @property
    def id(self) -> str:
        """Stable across runs: where, which operator, and a digest of the replacement."""
        digest = hashlib.sha1(self.after.encode()).hexdigest()[:8]
        return f"{self.file}:{self.line}:{self.col}:{self.operator}:{digest}"

    def describe(self) -> str:
        return f"{_short(self.before)}  ->  {_short(self.after)}"

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        start = offsets[self.line - 1] + _byte_to_char(lines[self.line - 1], self.col)
        end = start + len(self.before)
        if source[start:end] != self.before:
            raise ValueError(f"mutant {self.id} no longer matches its source")
        return source[:start] + self.after + source[end:]


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _byte_to_char(line: str, col: int) -> int:
    """ast gives UTF-8 byte offsets; strings index characters."""
    return len(line.encode()[:col].decode(errors="replace"))


# -----------------------------------------------------------------------------
# Generating mutants


def solution_lines(source: str) -> set[int]:
    """Line numbers strictly inside the solution regions (between the BEGIN and END markers)."""
    inside, lines = False, set()
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped == MARKER_BEGIN:
            inside = True
        elif stripped == MARKER_END:
            inside = False
        elif inside:
            lines.add(number)
    return lines


def generate(source: str, file: str) -> list[Mutant]:
    """Every mutant of the solution regions of one file, in source order."""
    region = solution_lines(source)
    if not region:
        return []
    tree = ast.parse(source)
    mutants: list[Mutant] = []

    def inside(node: ast.AST) -> bool:
        return hasattr(node, "lineno") and node.lineno in region and node.end_lineno in region

    def add(node: ast.AST, operator: str, replacement: ast.AST | str) -> None:
        before = ast.get_source_segment(source, node)
        if before is None:
            return
        after = replacement if isinstance(replacement, str) else ast.unparse(replacement)
        if after != before:
            mutants.append(Mutant(file, node.lineno, node.col_offset, operator, before, after))

    for node in ast.walk(tree):
        if not inside(node):
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            add(node, "arithmetic", ast.BinOp(node.left, ARITHMETIC[type(node.op)](), node.right))
        elif isinstance(node, ast.AugAssign) and type(node.op) in ARITHMETIC:
            add(node, "arithmetic", ast.AugAssign(node.target, ARITHMETIC[type(node.op)](), node.value))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in COMPARISON:
            add(node, "comparison", ast.Compare(node.left, [COMPARISON[type(node.ops[0])]()], node.comparators))
        elif isinstance(node, ast.BoolOp):
            add(node, "boolean", ast.BoolOp(BOOLEAN[type(node.op)](), node.values))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, "boolean", node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            for delta in (1, -1):
                add(node, "constant", ast.Constant(node.value + delta))
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and not any(
                isinstance(a, ast.Starred) for a in node.args[:2]) and _call_name(node) not in SYMMETRIC_CALLS:
            swapped = ast.Call(node.func, [node.args[1], node.args[0], *node.args[2:]], node.keywords)
            add(node, "arguments", swapped)
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            add(node, "return", "return None")
        if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)) and not (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            add(node, "statement", "pass")
    mutants.sort(key=lambda m: (m.line, m.col, m.operator, m.after))
    return mutants


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def lab_mutants(lab: str) -> list[Mutant]:
    lab_dir = REFERENCE_DIR / lab
    mutants = []
    for path in sorted(lab_dir.rglob("*.py")):
        mutants += generate(path.read_text(), path.relative_to(lab_dir).as_posix())
    return mutants


EXCLUSION_KINDS = ("equivalent", "gpu_only")


def excluded_mutants(lab: str) -> dict[str, tuple[str, str]]:
    """id -> (kind, reason), from autograder/<lab>/hidden/equivalent_mutants.json (kind: equivalent | gpu_only)."""
    path = runner.AUTOGRADER_DIR / lab / "hidden" / "equivalent_mutants.json"
    if not path.exists():
        return {}
    excluded = {}
    for entry in json.loads(path.read_text()):
        kind = entry.get("kind", "equivalent")
        if kind not in EXCLUSION_KINDS or not entry.get("reason"):
            raise runner.GraderError(f"{path}: every entry needs a reason and a kind in {EXCLUSION_KINDS}: {entry}")
        excluded[entry["id"]] = (kind, entry["reason"])
    return excluded


# -----------------------------------------------------------------------------
# Grading mutants


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | equivalent | gpu_only
    by: str  # the first test that lost points, or why
    seconds: float


def grade_mutant(lab: str, mutant: Mutant, *, jail: str, time_limit_scale: float) -> Outcome:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutant-") as folder:
        target = Path(folder)
        shutil.copytree(REFERENCE_DIR / lab, target / lab, ignore=shutil.ignore_patterns("__pycache__", "results"))
        path = target / lab / mutant.file
        path.write_text(mutant.apply(path.read_text()))
        # the mutated part's tests first: most mutants die there, and fail-fast skips the rest
        stem = Path(mutant.file).stem
        tests = sorted((p.name for p in (runner.AUTOGRADER_DIR / lab).glob("test_*.py")),
                       key=lambda name: name != f"test_{stem}.py")
        options = runner.Options(tests=tuple(tests), include_hidden=True, time_limit_scale=time_limit_scale,
                                 jail=jail, fail_fast=True)
        try:
            results, _ = runner.grade_lab(lab, target, options)
        except runner.GraderError as error:
            return Outcome(mutant, "killed", f"grading failed: {str(error).splitlines()[0]}",
                           time.monotonic() - start)
    lost = next((r for r in results if r.outcome == "failed" and "--fail-fast" not in r.message), None)
    if lost is not None:
        return Outcome(mutant, "killed", f"{lost.file}::{lost.name}", time.monotonic() - start)
    return Outcome(mutant, "survived", "", time.monotonic() - start)


def run(lab: str, *, budget: int | None = None, jobs: int = 2, seed: int = 0, jail: str = "auto",
        time_limit_scale: float = 1.0, progress: bool = True, only: tuple[str, ...] = ()) -> list[Outcome]:
    """Grade the lab's mutants (a random sample of `budget` of them, if given; those whose id contains one of `only`,
    if given) and return the outcomes."""
    lab = runner.resolve_lab(lab)
    mutants = lab_mutants(lab)
    excluded = excluded_mutants(lab)
    if has_gpu_device():  # GPU-only mutants are graded where the GPU is
        excluded = {key: value for key, value in excluded.items() if value[0] != "gpu_only"}
    unknown = sorted(set(excluded) - {m.id for m in mutants})
    if unknown:
        raise runner.GraderError(f"{lab}: equivalent_mutants.json names mutants that no longer exist: {unknown[:3]}")
    if only:
        mutants = [m for m in mutants if any(part in m.id for part in only)]
    if budget is not None and budget < len(mutants):
        mutants = sorted(random.Random(seed).sample(mutants, budget), key=lambda m: (m.file, m.line, m.col))
    outcomes = [Outcome(m, excluded[m.id][0], excluded[m.id][1], 0.0) for m in mutants if m.id in excluded]
    todo = [m for m in mutants if m.id not in excluded]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(grade_mutant, lab, m, jail=jail, time_limit_scale=time_limit_scale): m for m in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            outcome = future.result()
            outcomes.append(outcome)
            if progress:
                print(f"[mutate] {done}/{len(todo)} {outcome.status:<9} {outcome.mutant.id}  "
                      f"{outcome.mutant.describe()}  ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
    outcomes.sort(key=lambda o: (o.mutant.file, o.mutant.line, o.mutant.col, o.mutant.operator, o.mutant.after))
    return outcomes


# -----------------------------------------------------------------------------
# Reporting


def kill_rate(outcomes: list[Outcome]) -> float:
    counted = [o for o in outcomes if o.status in ("killed", "survived")]
    return sum(o.status == "killed" for o in counted) / len(counted) if counted else 1.0


def report(lab: str, outcomes: list[Outcome]) -> str:
    lines = [f"Mutation testing of {lab}: {len(outcomes)} mutants of the reference's solution regions", ""]
    files = sorted({o.mutant.file for o in outcomes})
    operators = sorted({o.mutant.operator for o in outcomes})
    lines.append(f"{'':<24}" + "".join(f"{op:>12}" for op in operators) + f"{'total':>12}")
    for file in files:
        row = [o for o in outcomes if o.mutant.file == file]
        cells = []
        for op in operators + ["*"]:
            chosen = [o for o in row if op in ("*", o.mutant.operator) and o.status in ("killed", "survived")]
            cells.append(f"{sum(o.status == 'killed' for o in chosen)}/{len(chosen)}" if chosen else "-")
        lines.append(f"{file:<24}" + "".join(f"{c:>12}" for c in cells))
    counted = [o for o in outcomes if o.status in ("killed", "survived")]
    killed = sum(o.status == "killed" for o in counted)
    equivalent = [o for o in outcomes if o.status == "equivalent"]
    gpu_only = [o for o in outcomes if o.status == "gpu_only"]
    lines += ["", f"killed {killed} of {len(counted)} ({100 * kill_rate(outcomes):.1f}%); excluded: "
                  f"{len(equivalent)} equivalent, {len(gpu_only)} only killable on a GPU (none here)"]
    for outcome in equivalent + gpu_only:
        lines.append(f"  {outcome.status:<10} {outcome.mutant.id}  {outcome.mutant.describe()}: {outcome.by}")
    survivors = [o for o in outcomes if o.status == "survived"]
    if survivors:
        lines += ["", "Survivors (bugs the tests let through)", "--------------------------------------"]
        for outcome in survivors:
            lines += [f"{outcome.mutant.id}   {outcome.mutant.describe()}", _diff(lab, outcome.mutant), ""]
    return "\n".join(lines)


def _diff(lab: str, mutant: Mutant) -> str:
    source = (REFERENCE_DIR / lab / mutant.file).read_text()
    mutated = mutant.apply(source)
    diff = difflib.unified_diff(source.splitlines(), mutated.splitlines(), f"reference/{lab}/{mutant.file}",
                                "mutant", n=1, lineterm="")
    return "\n".join("    " + line for line in diff)


def to_json(lab: str, outcomes: list[Outcome]) -> dict:
    return {"lab": lab, "kill_rate": kill_rate(outcomes),
            "mutants": [{**asdict(o.mutant), "id": o.mutant.id, "status": o.status, "by": o.by,
                         "seconds": round(o.seconds, 2)} for o in outcomes]}
