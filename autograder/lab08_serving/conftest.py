"""Lab 08's tests. Shared builders live in serving_cases.py (tiny models, HF Llamas from configs, greedy decoding
without a cache): the grader reaches it as `autograder.lab08_serving.serving_cases`, a worker as `serving_cases`
(producer modules are top-level there); `_cases()` in each test file picks the right one. The code under test runs
only in the worker, through the `student` fixture."""
