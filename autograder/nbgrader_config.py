# nbgrader course configuration for the kit (copied into the course directory by `python -m autograder release OUT
# --nbgrader COURSE`). Each lab is one assignment: source/<lab>/ holds the notebook and the lab's stub modules.
import os
from pathlib import Path

c = get_config()  # noqa: F821 (nbgrader provides get_config)

c.CourseDirectory.course_id = "systems-for-large-models"
c.CourseDirectory.root = "."
# the lab's Python modules are part of the submission, not just the notebook
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*"]
c.CourseDirectory.max_file_size = 1_000_000  # kB: the corpus and plots are small; anything huge is a mistake
# each autograder cell grades one part in a subprocess with its own per-test limits; this bounds the whole cell.
# (nbgrader's Execute always continues after a failing cell: a broken experiment cannot stop the graded cells.)
c.ExecutePreprocessor.timeout = 900
c.ExecutePreprocessor.interrupt_on_timeout = True

# The grades come from the autograder run outside the student's kernel (autograder/nbgrader_grading.py): right
# after nbgrader executes the notebook, TrustedGrades replaces every graded cell's output with that verdict. While
# nbgrader runs the notebook, grade_part inside the kernel skips its own grading (this flag).
from autograder.nbgrader_grading import AUTOGRADE_FLAG, TrustedGrades  # noqa: E402
from nbgrader.converters.autograde import Autograde  # noqa: E402
from nbgrader.preprocessors import Execute  # noqa: E402

os.environ[AUTOGRADE_FLAG] = "1"
_steps = list(Autograde.class_traits()["autograde_preprocessors"].default())  # nbgrader's own pipeline
c.Autograde.autograde_preprocessors = _steps[: _steps.index(Execute) + 1] + [TrustedGrades] + _steps[_steps.index(Execute) + 1:]

# nbgrader autograde normally copies every file of source/<lab>/ over the submission (so students cannot tamper with
# provided files). A lab's Python modules are the student's work, so they must be kept: list them per assignment.
# (The tests are not in the assignment at all: they live in the instructor's kit, which the grader runs.)
_source = Path(__file__).resolve().parent / "source"
c.Autograde.exclude_overwriting = {
    lab.name: sorted(p.relative_to(lab).as_posix() for p in lab.rglob("*.py")) for lab in _source.glob("lab*")
}
