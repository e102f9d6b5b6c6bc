"""Lab 04: model parallelism."""
