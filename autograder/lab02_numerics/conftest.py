"""Lab 02's tests build their models and batches with common.testing (tiny_model, corpus_batch), in the grader and in
the worker alike, and compute every expectation in the grader (formulas.py holds the quantization formulas); the code
under test runs only in the worker, through the `student` fixture."""
