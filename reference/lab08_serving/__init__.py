"""Lab 08: serving with a paged KV cache (block manager, paged attention, continuous batching)."""
