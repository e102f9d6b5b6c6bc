"""Lab 07: FlashAttention-2 in Triton (forward and backward, causal, GQA), plugged into a HF model."""
