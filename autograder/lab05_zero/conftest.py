"""Lab 05's tests: producers (in the test files and workers.py) run the submission in the grading worker, often on
several ranks through common.launch.run_distributed; the tests compute what is expected here, in the grader, from
workers.expected_training (one process, torch.optim.AdamW) and the paper's formulas."""
