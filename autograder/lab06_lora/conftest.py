"""Lab 06's tests build small HF models with hf_models.py, in the grader and in the worker alike; the code under test
runs only in the worker, through the `student` fixture. Expectations come from float64 formulas, from torchao's NF4
(a library, not student code) and from peft, which runs here in the grader."""

import sys
from pathlib import Path

# the worker imports hf_models beside the test files; the grader finds it under the same name from here
sys.path.insert(0, str(Path(__file__).resolve().parent))
