"""Lab 02: numerics: mixed precision training (loss scaling, fp32 master weights, bf16 autocast) and quantization
(int8 absmax and zero-point, group-wise int4, NF4 with double quantization, a Triton W4A16 dequantize-matmul kernel)."""
