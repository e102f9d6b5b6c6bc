"""Lab 06 hidden tests (memory): another shape, and the size of dropout masks on CUDA."""

import pytest
import torch

from common.testing import describe

SHAPE = dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4, num_kv_heads=2)


def _measured_odd(method, config, dtype):
    from peft import LoraConfig, get_peft_model

    import hf_models
    from autograder.lab06_lora.test_memory import _measured_step

    model = hf_models.llama(dtype=dtype, num_hidden_layers=3)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=config["r"], lora_dropout=config.get("dropout", 0.0),
                                                 target_modules=list(config["target_modules"])),
                               autocast_adapter_dtype=False)
    model.train()
    return _measured_step(model, hf_models.tokens(batch_size=3, seq_len=7))


@pytest.mark.points(2)
@pytest.mark.parametrize("method, config, dtype", [
    ("full", None, torch.bfloat16),
    ("lora", dict(r=2, target_modules=("v_proj", "up_proj", "down_proj", "o_proj"), dropout=0.2), torch.float32),
])
def test_another_shape_measured(student, method, config, dtype):
    """d48, FFN 80, 3 layers, B3 N7: predictions equal a measured step."""
    from autograder.lab06_lora.test_memory import predicted

    got = student.run(predicted, SHAPE, method, config, dtype, 3, 7)
    want = _measured_odd(method, config, dtype)
    for key in want:
        assert got[key] == want[key], (f"predict_memory ({method}, {config}) {key}: {got[key]:,} bytes, measured "
                                       f"{want[key]:,} on {describe(shape=SHAPE)}")


@pytest.mark.points(1)
def test_cuda_dropout_masks_are_one_byte(student):
    """On CUDA a dropout mask is 1 byte per element, on the CPU b bytes: the prediction differs by exactly that."""
    from autograder.lab06_lora.test_memory import predicted

    config = dict(r=4, target_modules=("q_proj", "k_proj", "down_proj"), dropout=0.1)
    B, N, b = 2, 9, 4
    cpu = student.run(predicted, SHAPE, "lora", config, torch.float32, B, N, "cpu")
    cuda = student.run(predicted, SHAPE, "lora", config, torch.float32, B, N, "cuda")
    C, F, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_layers"]
    masked = L * (C + C + F) - 2 * C  # the first layer's q/k masks are never saved
    assert cpu["activations"] - cuda["activations"] == B * N * (b - 1) * masked, (
        f"predict_memory: CPU {cpu['activations']:,} vs CUDA {cuda['activations']:,} activation bytes; expected a "
        f"difference of {B * N * (b - 1) * masked:,} (masks of {masked} elements per token, {b} vs 1 byte)")
