"""Lab 01 on a GPU: CUDA peak memory really drops, and checkpointing works under bf16 autocast.

These need CUDA and are reported "not graded here" on a machine without one.
"""

import pytest
import torch

from common.testing import check_all_close, describe

# -----------------------------------------------------------------------------
# Producers: run in the worker


def cuda_peak_memory_of_plans() -> dict:
    """Peak CUDA memory of a training step of a 12-layer "small" model, without and with the sqrt plan."""
    from common.measure import cuda_peak_memory
    from common.model import ModelConfig, Transformer
    from lab01_memory.plans import CheckpointConfig, apply_checkpointing

    torch.manual_seed(0)
    config = ModelConfig.preset("small", num_layers=12, max_seq_len=512)
    model = Transformer(config).cuda()
    tokens = torch.randint(0, config.vocab_size, (8, 512), device="cuda")

    def step(m):
        m.zero_grad(set_to_none=True)
        m.loss(tokens, tokens).backward()

    step(model)  # warm-up: allocate the gradients once, outside the measurement
    plain = cuda_peak_memory(lambda: step(model))
    planned = apply_checkpointing(model, config=CheckpointConfig(plan="sqrt"))
    return {"plain": plain, "checkpointed": cuda_peak_memory(lambda: step(planned))}


def bf16_autocast_gradients(use_plan: bool) -> dict:
    """Gradients of a tiny model (dropout 0.1) under CUDA bf16 autocast, with every block checkpointed or not."""
    from common.testing import corpus_batch, gradients, tiny_model

    model = tiny_model(num_layers=4, dropout=0.1, dtype=torch.float32).cuda()
    if use_plan:
        from lab01_memory.plans import CheckpointConfig, apply_checkpointing

        model = apply_checkpointing(model, config=CheckpointConfig(plan="every_k", k=1))
    tokens, targets = (t.cuda() for t in corpus_batch(batch_size=4, seq_len=32))
    torch.manual_seed(1)
    torch.cuda.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(tokens, targets)
    loss.backward()
    return {name: g.float() for name, g in gradients(model).items()}


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.gpu
@pytest.mark.points(2)
@pytest.mark.time_limit(180)
def test_cuda_peak_memory_drops(student):
    """On the GPU, the sqrt plan cuts the peak memory of a training step of a 12-layer model by at least 40%."""
    got = student.run(cuda_peak_memory_of_plans)
    assert got["checkpointed"] < 0.6 * got["plain"], (
        f"sqrt checkpointing peak {got['checkpointed'] / 2**20:.1f} MiB vs {got['plain'] / 2**20:.1f} MiB without: "
        "expected at least a 40% drop")


@pytest.mark.gpu
@pytest.mark.points(2)
@pytest.mark.time_limit(180)
def test_bf16_autocast_gradients_match(student):
    """Under bf16 autocast on CUDA, the recompute replays autocast (and dropout), so gradients match the plain model."""
    got = student.run(bf16_autocast_gradients, True)
    want = student.run(bf16_autocast_gradients, False)  # the plain model needs no student code, but the same GPU
    check_all_close(got, want, name="checkpoint under CUDA bf16 autocast", inputs=describe(tokens=(4, 32)),
                    dtype=torch.bfloat16)
