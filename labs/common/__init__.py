"""Shared infrastructure of the kit: the model, the data, launching processes, measuring, plotting, testing.

Nothing here is a solution, so nothing here is ever stubbed: labs/ and reference/ import the same code.
Importing this package does nothing expensive.
"""
