"""Producers of lab 06's hidden tests. The hidden worker imports this module; the hidden test files (with what is
expected) stay in the grader."""

import hf_models
import torch

from test_lora import _adapter, _base_layer


def lora_step_without_input_grad(case: dict, *, eval_mode: bool = False) -> dict:
    """LoRALinear on an input that needs no gradient (optionally in eval mode): output and adapter gradients."""
    from lab06_lora.lora import LoRAConfig, LoRALinear

    layer = LoRALinear(_base_layer(case), config=LoRAConfig(**case["config"]))
    A, B = _adapter(case)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    if eval_mode:
        layer.eval()
    torch.manual_seed(case.get("rng_seed", 0))
    y = layer(case["x"])
    (y * case["out_weights"].to(y.dtype)).sum().backward()
    return {"y": y.detach(), "dA": layer.lora_A.weight.grad, "dB": layer.lora_B.weight.grad}


def plain_formula(x, weight, bias, A, B, scaling, x_adapter) -> torch.Tensor:
    from lab06_lora.lora import lora_forward

    return lora_forward(x, weight, bias, A, B, scaling, x_adapter=x_adapter)


def adapter_keys(kind: str, config: dict) -> list[str]:
    from lab06_lora.inject import adapter_state_dict, apply_lora
    from lab06_lora.lora import LoRAConfig

    return sorted(adapter_state_dict(apply_lora(hf_models.model(kind), config=LoRAConfig(**config))))


def qlora_mixed_logits(config: dict, seed: int) -> torch.Tensor:
    """apply_qlora with fp32 adapters on a bf16 Llama: logits with seeded adapters."""
    from lab06_lora.lora import LoRAConfig, LoRALinear
    from lab06_lora.qlora import apply_qlora

    model = apply_qlora(hf_models.llama(dtype=torch.bfloat16, **hf_models.LLAMA_NF4),
                        config=LoRAConfig(**config, adapter_dtype=torch.float32))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    shapes = {n: (tuple(m.lora_A.weight.shape), tuple(m.lora_B.weight.shape)) for n, m in layers.items()}
    with torch.no_grad():
        for name, (a, b) in hf_models.adapter_values(shapes, seed=seed, scale=0.05).items():
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)
        return model(input_ids=hf_models.tokens()).logits
