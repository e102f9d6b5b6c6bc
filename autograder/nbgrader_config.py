# nbgrader course configuration for the kit (copied into the course directory by `python -m autograder release
# OUT --nbgrader`). Each lab is one assignment: source/<lab>/ holds the notebook and the lab's stub modules.
c = get_config()  # noqa: F821 (nbgrader provides get_config)

c.CourseDirectory.course_id = "systems-for-large-models"
c.CourseDirectory.root = "."
# the lab's Python modules are part of the submission, not just the notebook
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*"]
c.CourseDirectory.max_file_size = 1_000_000  # kB: the corpus and plots are small; anything huge is a mistake
# each autograder cell grades one part in a subprocess with its own per-test limits; this bounds the whole cell
c.ExecutePreprocessor.timeout = 900
c.ExecutePreprocessor.interrupt_on_timeout = True
# a notebook that stops at a broken experiment still runs its graded cells
c.Execute.allow_errors = True

# nbgrader autograde normally copies every file of source/<lab>/ over the submission (so students cannot tamper with
# provided files). A lab's Python modules are the student's work, so they must be kept: list them per assignment.
# (The tests are not in the assignment at all: they live in the instructor's kit, which the grade cells run.)
from pathlib import Path  # noqa: E402

_source = Path(__file__).resolve().parent / "source"
c.Autograde.exclude_overwriting = {
    lab.name: sorted(p.relative_to(lab).as_posix() for p in lab.rglob("*.py")) for lab in _source.glob("lab*")
}
