"""Lab 02's reference fast path (reference/lab02_numerics/w4a16_gemv.py, not a graded part): the split-K GEMV over the
pre-shuffled layout is exact against float64 in Triton's interpreter, for int4 and NF4, with and without split-K, at
M = 1..4, with bf16 activations, and hands M > 4 to the tiled kernel.

The kernels must be defined with TRITON_INTERPRET=1 set, so the checks run in a fresh interpreter.
"""

import os
import subprocess
import sys

from kit_helpers import KIT_ROOT

SCRIPT = r'''
import torch
from common.testing import check_close, random_tensor
from lab02_numerics.nf4 import NF4Config, dequantize_nf4, quantize_nf4
from lab02_numerics.quantize import int4_dequantize, int4_quantize
from lab02_numerics.w4a16_gemv import (GemvConfig, PreparedW4A16, prepare_w4a16, shuffle_codes, unshuffle_codes,
                                       w4a16_fast)

codes = torch.randint(0, 16, (6, 128), generator=torch.Generator().manual_seed(0))
assert torch.equal(unshuffle_codes(shuffle_codes(codes, 64), 64), codes), "the layout must round-trip"
cases = [("int4", 1, 45, 256, 64, None), ("int4", 3, 70, 512, 128, dict(block_n=32, split_k=2)),
         ("int4", 4, 33, 256, 32, dict(block_n=16, split_k=8)), ("nf4", 2, 64, 128, 64, dict(block_n=64, split_k=2)),
         ("nf4", 1, 19, 256, 32, None), ("int4", 5, 40, 128, 32, None), ("nf4", 17, 24, 64, 32, None)]
for seed, (kind, M, N, K, P, config) in enumerate(cases):
    w = random_tensor(N, K, seed=seed) * 0.05
    if kind == "int4":
        weight = int4_quantize(w, group_size=P)
        w_hat = int4_dequantize(weight)
    else:
        weight = quantize_nf4(w, config=NF4Config(block_size=P, double_quant=seed % 2 == 0))
        w_hat = dequantize_nf4(weight)
    prepared = prepare_w4a16(weight)
    assert prepared.words.shape == (K // P, P // 8, N) and prepared.words.dtype == torch.int32
    # words[g, w, n], nibble i: row n's column g P + i P / 8 + w
    n, g, w, i = N - 1, K // P - 1, 1, 5
    word = int(prepared.words[g, w, n]) & 0xFFFFFFFF
    code = (word >> (4 * i)) & 0xF
    if kind == "int4":
        byte = int(weight.packed[n, (g * P + i * (P // 8) + w) // 2])
        assert code == (byte >> (4 * ((g * P + i * (P // 8) + w) % 2))) & 0xF, "the layout puts a code in the wrong nibble"

    x = random_tensor(M, K, seed=100 + seed)
    y = w4a16_fast(x, prepared, config=None if config is None else GemvConfig(**config))
    expected = x.double() @ w_hat.double().t()
    assert y.dtype == torch.float32 and y.shape == (M, N), (y.dtype, y.shape)
    check_close(y, expected, name=f"w4a16_fast ({kind}, M={M}, N={N}, K={K}, P={P}, {config})",
                atol=1e-6 * K ** 0.5 * float(expected.abs().max()))
x = random_tensor(2, 256, seed=7).to(torch.bfloat16)
weight = int4_quantize(random_tensor(30, 256, seed=8), group_size=64)
y = w4a16_fast(x, prepare_w4a16(weight), config=GemvConfig(block_n=16, split_k=2))
expected = x.double() @ int4_dequantize(weight).double().t()
assert y.dtype == torch.bfloat16
check_close(y, expected, name="w4a16_fast (bf16 activations, split-K)", atol=1e-2 * float(expected.abs().max()))
for bad, error in [(lambda: prepare_w4a16(torch.ones(2)), TypeError),
                   (lambda: w4a16_fast(torch.ones(2, 128, dtype=torch.float64), prepare_w4a16(weight)), TypeError),
                   (lambda: w4a16_fast(torch.ones(2, 128), prepare_w4a16(weight)), ValueError),
                   (lambda: w4a16_fast(torch.ones(2, 256), prepare_w4a16(weight),
                                       config=GemvConfig(split_k=8)), ValueError)]:
    try:
        bad()
    except error:
        pass
    else:
        raise AssertionError(f"expected {error.__name__}")
print("ok")
'''


def test_gemv_fast_path_is_exact_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(KIT_ROOT / "reference"), str(KIT_ROOT / "labs")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=KIT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-3000:]
