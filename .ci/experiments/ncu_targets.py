"""One profiled call of each kernel target of issue 18, for ncu (warm-ups run outside the profiled range).

    ncu --profile-from-start off --section SpeedOfLight ... python .ci/experiments/ncu_targets.py gemv|fa_fwd|fa_bwd

gemv: w4a16_fast int4 and NF4 and the bf16 matmul at M = 1, K = N = 8192; fa_fwd: ours and cuDNN's forward at
B4 H32 N4096 D128 causal; fa_bwd: forward and backward at B1 H16 N16384 D64 causal. Records (H200, 2026-11-29):
reference/lab02_numerics/results/h200/ncu_gemv_*.txt, reference/lab07_flash_attention/results/h200_ncu_*.txt.
"""
import sys

import torch
import torch.nn.functional as F

sys.path[:0] = ["reference", "labs", "."]
what = sys.argv[1]
dev = "cuda"
torch.manual_seed(0)
if what.startswith("fa"):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from lab07_flash_attention.attention import flash_attention
    if what.endswith("fwd"):
        B, H, N, D, bwd = 4, 32, 4096, 128, False
    else:
        B, H, N, D, bwd = 1, 16, 16384, 64, True
    q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=i < 3) for i in range(4))

    def ours():
        o = flash_attention(q, k, v, causal=True)
        if bwd:
            o.backward(do)

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if bwd:
            o.backward(do)
    fns = [ours, cudnn]
elif what.startswith("gemv"):
    from lab02_numerics.nf4 import NF4Config, quantize_nf4
    from lab02_numerics.quantize import int4_quantize
    from lab02_numerics.w4a16_gemv import prepare_w4a16, w4a16_fast
    K = N = 8192
    w = torch.randn(N, K, device=dev) * 0.02
    pi = prepare_w4a16(int4_quantize(w, group_size=128))
    pn = prepare_w4a16(quantize_nf4(w, config=NF4Config(block_size=64)))
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    wb = w.to(torch.bfloat16)
    fns = [lambda: w4a16_fast(x, pi), lambda: w4a16_fast(x, pn), lambda: x @ wb.t()]
for f in fns:
    for _ in range(3):
        f()
torch.cuda.synchronize()
torch.cuda.profiler.start()
for f in fns:
    f()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
