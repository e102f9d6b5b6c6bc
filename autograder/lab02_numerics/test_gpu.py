"""Lab 02 on a GPU: the compiled W4A16 kernel at decode shapes, and the fp16/bf16 training step on CUDA.

These need CUDA and are reported "not graded here" on a machine without one.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.gpu
@pytest.mark.points(3)
@pytest.mark.time_limit(180)
@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_compiled_kernel_bf16_decode_shapes(scheme):
    """Compiled (not interpreted): bf16 activations, M = 1..16, ragged N, default tiles with split-K, vs torch."""
    from lab02_numerics.nf4 import NF4Config, dequantize_nf4, quantize_nf4
    from lab02_numerics.quantize import int4_dequantize, int4_quantize
    from lab02_numerics.w4a16 import w4a16_matmul

    for M, N, K in [(1, 4096, 4096), (5, 1000, 2048), (16, 4100, 1024)]:
        w = (random_tensor(N, K, seed=M) * 0.02).cuda()
        if scheme == "int4":
            weight = int4_quantize(w, group_size=128)
            w_hat = int4_dequantize(weight)
        else:
            weight = quantize_nf4(w, config=NF4Config(block_size=64))
            w_hat = dequantize_nf4(weight)
        x = random_tensor(M, K, seed=100 + M).cuda().to(torch.bfloat16)
        got = w4a16_matmul(x, weight)
        expected = x.double() @ w_hat.to(torch.bfloat16).double().t()  # what the kernel multiplies: bf16 W'
        check_close(got, expected, name=f"w4a16_matmul compiled ({scheme})", inputs=describe(x=x, N=N),
                    dtype=torch.bfloat16, atol=2e-2 * float(expected.abs().max()))


@pytest.mark.gpu
@pytest.mark.points(2)
@pytest.mark.time_limit(180)
def test_fp16_scaler_matches_gradscaler_on_cuda(make_model, make_batch):
    """fp16 autocast on CUDA with the reference scaler: same scale and same weights as torch.amp.GradScaler."""
    from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

    tokens, targets = (t.cuda() for t in make_batch(batch_size=4, seq_len=32))
    runs = {}
    for kind in ("ours", "torch"):
        model = make_model().cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = (DynamicLossScaler(LossScalerConfig(init_scale=2.0**24, growth_interval=2)) if kind == "ours"
                  else torch.amp.GradScaler("cuda", init_scale=2.0**24, growth_interval=2))
        scales = []
        for _ in range(8):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model.loss(tokens, targets)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scales.append(float(scaler.get_scale()))
        runs[kind] = scales, model.lm_head.weight.detach().clone()
    assert runs["ours"][0] == runs["torch"][0], f"scales on CUDA: ours {runs['ours'][0]}, GradScaler {runs['torch'][0]}"
    check_close(runs["ours"][1], runs["torch"][1], name="lm_head after 8 fp16 steps vs GradScaler", dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.points(1)
@pytest.mark.time_limit(180)
def test_bf16_train_step_on_cuda(make_model, make_batch):
    """train_step(precision='bf16') on CUDA: the loss matches fp32 at bf16 tolerance, parameters stay fp32."""
    from lab02_numerics.master_weights import train_step

    tokens, targets = (t.cuda() for t in make_batch(batch_size=4, seq_len=32))
    losses = {}
    for precision in ("fp32", "bf16"):
        model = make_model().cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[precision] = train_step(model, tokens, targets, optimizer, precision=precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    check_close(losses["bf16"], losses["fp32"], name="train_step bf16 loss vs fp32 on CUDA", dtype=torch.bfloat16)
