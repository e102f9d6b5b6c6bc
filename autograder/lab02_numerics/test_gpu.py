"""Lab 02 on a GPU: the compiled W4A16 kernel at decode shapes, the fp16/bf16 training step on CUDA, and a tiered speed
credit for W4A16 against torch's bf16 matmul timed in the same test.

These need CUDA and are reported "not graded here" on a machine without one.
"""

import pytest
import torch

from common.testing import check_close, corpus_batch, describe, random_tensor, tiny_model

SPEED_SHAPE = dict(N=4096, K=4096, group_size=128)  # one decode step of a 4096-wide layer, M = 1 token
L2_ROTATION_BYTES = 256 * 2**20  # weights cycled per timed call: well past the H200's 60 MB of L2


# -----------------------------------------------------------------------------
# Producers: run in the worker


def cuda_fp16_scaler_run(use_lab: bool) -> dict:
    """8 fp16 autocast AdamW steps of the tiny model on CUDA with unscale + clipping: the student's scaler, or
    torch.amp.GradScaler (the peer runs here too: it needs the same GPU, and no student code)."""
    if use_lab:
        from lab02_numerics.loss_scaler import DynamicLossScaler, LossScalerConfig

        scaler = DynamicLossScaler(LossScalerConfig(init_scale=2.0**24, growth_interval=2))
    else:
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24, growth_interval=2)
    model = tiny_model(num_layers=2, dtype=torch.float32).cuda()
    tokens, targets = (t.cuda() for t in corpus_batch(batch_size=4, seq_len=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
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
    return {"scales": scales, "lm_head": model.lm_head.weight.detach().cpu()}


def cuda_train_step_losses() -> dict:
    """train_step on CUDA in fp32 and bf16: the returned losses (of the initial model) and the parameter dtypes."""
    from lab02_numerics.master_weights import train_step

    tokens, targets = (t.cuda() for t in corpus_batch(batch_size=4, seq_len=32))
    out = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model(num_layers=2, dtype=torch.float32).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = train_step(model, tokens, targets, optimizer, precision=precision)
        out[precision] = {"loss": loss.detach().cpu(), "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    return out


def w4a16_speed(weight: dict, *, rounds: int = 7, calls: int = 40) -> dict:
    """Interleaved timing (common.bench) of w4a16_matmul and torch's bf16 matmul at M = 1, each call on the next of
    several weight copies (together past the L2, as a decode step walks through layers); CUDA graphs when the
    launcher can be captured, so that host launch overhead does not count. Also one result to check."""
    from common.bench import interleaved
    from lab02_numerics.w4a16 import w4a16_matmul

    from test_w4a16 import build_weight, own_kernel_only

    own_kernel_only()
    device = torch.device("cuda")
    N, K = weight["shape"]
    qw = build_weight(weight, device)
    bf16 = (random_tensor(N, K, seed=7) * 0.02).to(device, torch.bfloat16)
    x = random_tensor(1, K, seed=8).to(device, torch.bfloat16)
    int4_bytes = qw.packed.numel() + 4 * qw.scales.numel()
    int4_copies = [qw] + [type(qw)(packed=qw.packed.clone(), scales=qw.scales.clone(), group_size=qw.group_size,
                                   shape=qw.shape) for _ in range(max(1, L2_ROTATION_BYTES // int4_bytes) - 1)]
    bf16_copies = [bf16] + [bf16.clone() for _ in range(max(1, L2_ROTATION_BYTES // (2 * N * K)) - 1)]
    y = w4a16_matmul(x, qw).float().cpu()

    def many(call, copies):
        def run():
            for index in range(calls):
                call(copies[index % len(copies)])
        return run

    variants = {"bf16 matmul": many(lambda w: x @ w.t(), bf16_copies),
                "w4a16_matmul": many(lambda w: w4a16_matmul(x, w), int4_copies)}
    mode = "CUDA graph"
    try:
        graphs = {}
        for name, run in variants.items():
            run()  # compile and allocate outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graphs[name] = graph.replay
        timed = graphs
    except Exception as error:  # a launcher that cannot be captured (a host sync, say) is timed eagerly
        mode = f"eager ({type(error).__name__} under CUDA graph capture)"
        torch.cuda.synchronize()
        timed = variants
    result = interleaved(timed, rounds=rounds, reps=5, warmup=2, device=device)
    ratio = result.ratio("w4a16_matmul", "bf16 matmul")
    return {"y": y, "mode": mode, "ratio": ratio.as_dict(),
            "us": {name: 1e3 * result.time(name).median / calls for name in timed}}


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.gpu
@pytest.mark.points(3)
@pytest.mark.time_limit(180)
@pytest.mark.parametrize("scheme", ["int4", "nf4"])
def test_compiled_kernel_bf16_decode_shapes(student, scheme):
    """Compiled (not interpreted): bf16 activations, M = 1..16, ragged N, default tiles with split-K, vs float64
    with W' rounded to bf16 (what the kernel multiplies)."""
    from autograder.lab02_numerics import formulas as f
    from autograder.lab02_numerics.test_w4a16 import make_weight, w4a16

    for M, N, K in [(1, 4096, 4096), (5, 1000, 2048), (16, 4100, 1024)]:
        group_size = 128 if scheme == "int4" else 64
        weight = make_weight(scheme, N, K, group_size, seed=M, scale=0.02)
        double = None
        scales = weight["scales"]
        if scheme == "nf4":
            stored = f.double_quant(weight["scales"], 256)
            double = {"q": stored["q"].to(torch.int8), "second": stored["second"], "mean": stored["mean"],
                      "block": 256}
            scales = f.double_dequant(stored["q"], stored["second"], stored["mean"], 256).reshape(scales.shape)
        x = random_tensor(M, K, seed=100 + M).to(torch.bfloat16)
        got = student.run(w4a16, x, weight, x_dtype="bfloat16", double=double)
        decode = f.int4_decode if scheme == "int4" else f.nf4_decode
        w_hat = decode(weight["packed"], scales, group_size).to(torch.bfloat16)
        expected = x.double() @ w_hat.double().t()
        assert got["dtype"] == "torch.bfloat16" and got["shape"] == (M, N), \
            f"w4a16_matmul compiled ({scheme}): {got['shape']} {got['dtype']}, expected ({M}, {N}) bfloat16"
        check_close(got["y"], expected, name=f"w4a16_matmul compiled ({scheme})", inputs=describe(x=x, N=N),
                    dtype=torch.bfloat16, atol=2e-2 * float(expected.abs().max()))


@pytest.mark.gpu
@pytest.mark.points(2)
@pytest.mark.time_limit(180)
def test_fp16_scaler_matches_gradscaler_on_cuda(student):
    """fp16 autocast on CUDA with the student's scaler: same scale and same weights as torch.amp.GradScaler."""
    got = student.run(cuda_fp16_scaler_run, True)
    want = student.run(cuda_fp16_scaler_run, False)
    assert got["scales"] == want["scales"], f"scales on CUDA: yours {got['scales']}, GradScaler {want['scales']}"
    check_close(got["lm_head"], want["lm_head"], name="lm_head after 8 fp16 steps vs GradScaler", dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.points(1)
@pytest.mark.time_limit(180)
def test_bf16_train_step_on_cuda(student):
    """train_step on CUDA: the fp32 loss equals the grader's (CPU, fp32), the bf16 loss matches it at bf16 tolerance,
    and the parameters stay fp32."""
    got = student.run(cuda_train_step_losses)
    tokens, targets = corpus_batch(batch_size=4, seq_len=32)
    with torch.no_grad():
        expected = tiny_model(num_layers=2, dtype=torch.float32).loss(tokens, targets)
    inputs = describe(tokens=tokens)
    check_close(got["fp32"]["loss"], expected, name="train_step fp32 loss on CUDA", inputs=inputs, rtol=1e-4)
    check_close(got["bf16"]["loss"], expected, name="train_step bf16 loss on CUDA", inputs=inputs,
                dtype=torch.bfloat16)
    for precision in ("fp32", "bf16"):
        assert got[precision]["dtypes"] == ["torch.float32"], f"train_step({precision}) changed parameter dtypes"


@pytest.mark.gpu
@pytest.mark.points(3)
@pytest.mark.time_limit(240)
@pytest.mark.parametrize("tier", [3.0, 2.0, 1.0])
def test_speed_credit_w4a16_decode(student, tier):
    """Tiered speed credit: int4 W4A16 (groups of 128) at M = 1, K = N = 4096, bf16 activations, timed against torch's
    bf16 matmul of the same shape in the same run (interleaved rounds, weights rotated past the L2, CUDA graphs). One
    point for each tier the median ratio (your time / bf16's) reaches: 3.0x, 2.0x and 1.0x. Bytes alone would allow
    about 0.27x (a quarter of the bytes, plus scales); the result must be correct for any credit."""
    from autograder.lab02_numerics.test_w4a16 import expected_output, make_weight

    weight = make_weight("int4", SPEED_SHAPE["N"], SPEED_SHAPE["K"], SPEED_SHAPE["group_size"], seed=9, scale=0.02)
    got = student.run(w4a16_speed, weight)
    x = random_tensor(1, SPEED_SHAPE["K"], seed=8).to(torch.bfloat16)
    expected = expected_output(x, weight)
    check_close(got["y"], expected, name="w4a16_matmul (speed shape)", inputs=describe(x=x, N=SPEED_SHAPE["N"]),
                dtype=torch.bfloat16, atol=2e-2 * float(expected.abs().max()))
    ratio = got["ratio"]
    print(f"W4A16 speed shape ({got['mode']}): yours {got['us']['w4a16_matmul']:.1f} us, bf16 matmul "
          f"{got['us']['bf16 matmul']:.1f} us per call; ratio {ratio['median']:.3f} "
          f"[{ratio['low']:.3f}-{ratio['high']:.3f}]")
    assert ratio["median"] <= tier, (
        f"w4a16_matmul at M=1, K=N=4096 (int4, groups of 128), {got['mode']}: {got['us']['w4a16_matmul']:.1f} us vs "
        f"torch's bf16 matmul {got['us']['bf16 matmul']:.1f} us, ratio {ratio['median']:.3f} (rounds "
        f"{ratio['low']:.3f}-{ratio['high']:.3f}); this tier needs a ratio <= {tier}")
