"""Lab 05: ZeRO stages 1, 2 and 3 with CPU offload, mixed precision, sharded checkpoints and memory accounting."""
