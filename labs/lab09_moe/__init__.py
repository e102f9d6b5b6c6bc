"""Lab 09: Mixture of Experts: top-k routing with load balancing and capacity, token dispatch, a Triton grouped GEMM,
and expert parallelism over all-to-all."""
