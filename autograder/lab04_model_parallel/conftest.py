"""Lab 04's tests run the code under test only in the grading worker: workers.py holds the producers and the rank
functions (spawned by common.launch.run_distributed inside the worker) and the helpers that put the ranks' slices
back together in the grader."""
