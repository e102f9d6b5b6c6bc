"""Lab 10's tests run the code under test only in the grading worker: workers.py holds the producers (which call the
planner's functions on plain-data cases, and start the ranks that train with run_plan) and the rank functions. The
tests compute every expected value here, from the formulas written out again, brute force over small problems, or
one process's training run."""
