"""Lab 01: activation checkpointing and gradient accumulation."""
