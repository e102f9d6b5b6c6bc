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
