"""Lab 09's tests compute what they expect with expected.py (float64 loops over tokens and experts, written from the
papers' formulas); the code under test runs only in the worker, through the `student` fixture."""
