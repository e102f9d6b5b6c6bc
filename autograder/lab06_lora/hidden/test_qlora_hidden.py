"""Lab 06 hidden tests (QLoRA): fp32 adapters on the NF4 base, and a scale count 256 does not divide."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(1)
def test_fp32_adapters_on_the_nf4_base(student):
    """fp32 adapters on a bf16 NF4 model (peft's default dtype): the logits of the dequantized model with peft."""
    from peft import LoraConfig, get_peft_model

    import hf_models
    from autograder.lab06_lora.hidden.producers import qlora_mixed_logits
    from autograder.lab06_lora.test_qlora import _dequantized, _linear_names

    config = dict(r=3, alpha=6.0, target_modules="all-linear")
    got = student.run(qlora_mixed_logits, config, 9)
    model = hf_models.llama(dtype=torch.bfloat16, **hf_models.LLAMA_NF4)
    with torch.no_grad():
        for name in _linear_names(model):
            weight = model.get_submodule(name).weight
            weight.copy_(_dequantized(weight))
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6.0, target_modules="all-linear"))
    hf_models.set_peft_adapters(peft_model, seed=9, scale=0.05)
    with torch.no_grad():
        want = peft_model(input_ids=hf_models.tokens()).logits
    check_close(got, want, name="QLoRA with fp32 adapters: logits", inputs=describe(**config), dtype=torch.bfloat16)


@pytest.mark.points(1)
def test_scale_count_not_divisible_by_256(student):
    """120 scales: the second-level block is gcd(120, 256) = 8."""
    from autograder.lab06_lora.test_qlora import _dequantized, quantized_weight

    weight = random_tensor(40, 192, seed=3, dtype=torch.bfloat16)
    got = student.run(quantized_weight, weight, 64)
    check_close(got["dense"], _dequantized(weight, 64), name="quantize_nf4_weight (40, 192)",
                inputs=describe(weight=weight), rtol=0, atol=0)
