"""Lab 06, part 3: QLoRA (qlora.py): NF4 base weights with double quantization (torchao's NF4Tensor), dequantized on
the fly, adapters that get all the gradient.

Expectations come from torchao's own quantization (a library, not the student's code), applied here in the grader to
the same seeded weights, and from peft on the model whose weights are those dequantized values.
"""

import math

import hf_models
import pytest
import torch

from common.testing import check_close, describe, random_tensor

NF4_TABLE_MAX_HALF_GAP = (1.0 - 0.7230) / 2  # largest half-gap between neighbouring NF4 levels (0.7230 -> 1.0)
ADAPTER_SCALE = 0.05  # s B A about as large as the base weights (std 0.02), so bf16 rounding stays bf16 rounding

# -----------------------------------------------------------------------------
# Producers: run in the worker


def _set_adapters(model, seed: int) -> None:
    from lab06_lora.lora import LoRALinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    shapes = {n: (tuple(m.lora_A.weight.shape), tuple(m.lora_B.weight.shape)) for n, m in layers.items()}
    with torch.no_grad():
        for name, (a, b) in hf_models.adapter_values(shapes, seed=seed, scale=ADAPTER_SCALE).items():
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)


def _is_quantized(parameter) -> bool:
    return type(parameter) not in (torch.Tensor, torch.nn.Parameter)


def qlora_step(config: dict, seed: int) -> dict:
    """apply_qlora on a seeded bf16 Llama, seeded adapters, one forward and backward."""
    from lab06_lora.inject import count_parameters
    from lab06_lora.lora import LoRAConfig
    from lab06_lora.qlora import apply_qlora, weight_bytes

    model = apply_qlora(hf_models.llama(dtype=torch.bfloat16, **hf_models.LLAMA_NF4), config=LoRAConfig(**config))
    _set_adapters(model, seed)
    ids = hf_models.tokens()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "quantized": sorted(n for n, p in model.named_parameters() if _is_quantized(p)),
            "quantized_trainable": [n for n, p in model.named_parameters() if _is_quantized(p) and p.requires_grad],
            "weight_bytes": weight_bytes(model), "counts": tuple(count_parameters(model))}


def qlora_layer(case: dict) -> dict:
    """A single bias-free linear layer under apply_qlora: its output and input gradient, and what it saved."""
    from lab06_lora.lora import LoRAConfig
    from lab06_lora.qlora import apply_qlora

    net = torch.nn.Sequential(_layer(case))
    apply_qlora(net, config=LoRAConfig(r=case["r"], alpha=case["alpha"], target_modules=("0",)))
    layer = net[0]
    with torch.no_grad():
        layer.lora_A.weight.copy_(case["A"])
        layer.lora_B.weight.copy_(case["B"])
    x = case["x"].clone().requires_grad_(True)
    parameters = {p.untyped_storage().data_ptr() for p in net.parameters() if not _is_quantized(p)}
    saved = []

    def pack(tensor):
        if not _is_quantized(tensor) and tensor.untyped_storage().data_ptr() not in parameters:
            saved.append((tensor.numel(), tensor.untyped_storage().nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    y.float().square().sum().backward()
    return {"y": y.detach(), "dx": x.grad, "saved": saved}


def quantized_weight(weight: torch.Tensor, block_size: int) -> dict:
    from lab06_lora.qlora import NF4Config, quantize_nf4_weight

    parameter = quantize_nf4_weight(weight, config=NF4Config(block_size=block_size))
    return {"dense": parameter.to(weight.dtype), "requires_grad": parameter.requires_grad,
            "is_parameter": isinstance(parameter, torch.nn.Parameter), "shape": tuple(parameter.shape),
            "quantized": _is_quantized(parameter)}


def merge_nf4() -> None:
    from lab06_lora.lora import LoRAConfig
    from lab06_lora.qlora import apply_qlora

    net = apply_qlora(torch.nn.Sequential(torch.nn.Linear(64, 8)), config=LoRAConfig(r=2, target_modules=("0",)))
    net[0].merge()


def _layer(case: dict) -> torch.nn.Linear:
    layer = torch.nn.Linear(case["K"], case["N"], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(case["W"])
    return layer


# -----------------------------------------------------------------------------
# The grader's NF4: torchao on the same weights


def _dequantized(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    num_scales = weight.numel() // block_size
    return to_nf4(weight.detach().contiguous(), block_size, math.gcd(num_scales, 256)).get_original_weight()


def _nf4_bytes(weight: torch.Tensor) -> int:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    quantized = to_nf4(weight.detach().contiguous(), 64, math.gcd(weight.numel() // 64, 256))
    return sum(t.numel() * t.element_size() for t in (quantized.quantized_data, quantized.quantized_scalers,
                                                      quantized.quantization_factor, quantized.scaler_mean,
                                                      quantized.nf4))


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def _expected_step(config: dict, seed: int) -> dict:
    """peft on the bf16 model whose linear weights are the NF4-dequantized ones (bf16 adapters)."""
    from peft import LoraConfig, get_peft_model

    model = hf_models.llama(dtype=torch.bfloat16, **hf_models.LLAMA_NF4)
    with torch.no_grad():
        for name in _linear_names(model):
            weight = model.get_submodule(name).weight
            weight.copy_(_dequantized(weight))
    targets = config["target_modules"]
    peft_model = get_peft_model(model, LoraConfig(r=config["r"], lora_alpha=config["alpha"],
                                                  target_modules=targets if isinstance(targets, str) else list(targets)),
                                autocast_adapter_dtype=False)
    hf_models.set_peft_adapters(peft_model, seed=seed, scale=ADAPTER_SCALE)
    ids = hf_models.tokens()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": hf_models.peft_gradients(peft_model),
            "counts": peft_model.get_nb_trainable_parameters()}


# -----------------------------------------------------------------------------
# Tests: run in the grader

MODEL_CASES = {
    "all-linear r4": dict(r=4, alpha=8.0, target_modules="all-linear"),
    "q/v r2 (the other linears quantized too)": dict(r=2, alpha=6.0, target_modules=("q_proj", "v_proj")),
}


@pytest.mark.points(4)
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_qlora_model_is_the_dequantized_model_plus_adapters(student, name):
    """apply_qlora on a bf16 Llama: every linear weight but the output layer's is a frozen NF4 tensor; logits and loss
    are those of the model with the dequantized weights and the same adapters (peft, here); gradients reach exactly
    the adapters and agree with peft's on that model."""
    config = MODEL_CASES[name]
    got = student.run(qlora_step, config, 4)
    want = _expected_step(config, 4)
    inputs = describe(model="Llama bf16 d64", **config)
    linears = _linear_names(hf_models.llama(dtype=torch.bfloat16, **hf_models.LLAMA_NF4))
    adapted = set(hf_models.peft_layers(_peft_on(hf_models.llama(dtype=torch.bfloat16, **hf_models.LLAMA_NF4), config)))
    expected_quantized = sorted(f"{n}.base_layer.weight" if n in adapted else f"{n}.weight" for n in linears)
    assert got["quantized"] == expected_quantized, (
        f"apply_qlora ({name}): quantized weights {got['quantized'][:3]}..., expected every linear weight but "
        f"lm_head's: {expected_quantized[:3]}...")
    assert not got["quantized_trainable"], f"apply_qlora ({name}): NF4 weights must be frozen"
    check_close(got["logits"], want["logits"], name=f"QLoRA ({name}): logits vs the dequantized model",
                inputs=inputs, dtype=torch.bfloat16)
    check_close(got["loss"], want["loss"], name=f"QLoRA ({name}): loss", inputs=inputs, dtype=torch.bfloat16)
    assert sorted(got["grads"]) == sorted(want["grads"]), (
        f"QLoRA ({name}): gradients reached {sorted(got['grads'])[:4]}..., expected exactly the adapters")
    for key, expected in want["grads"].items():
        error = ((got["grads"][key].double() - expected.double()).norm() / expected.double().norm()).item()
        assert error < 5e-2, f"QLoRA ({name}): gradient of {key} off by {error:.2e} (relative norm) on {inputs}"
    assert tuple(got["counts"]) == tuple(want["counts"]), (
        f"count_parameters after apply_qlora ({name}) = {got['counts']}, peft counts {want['counts']} (an NF4 "
        "weight counts as the weights it stands for)")


def _peft_on(model, config):
    from peft import LoraConfig, get_peft_model

    targets = config["target_modules"]
    return get_peft_model(model, LoraConfig(r=config["r"], target_modules=targets if isinstance(targets, str)
                                            else list(targets)))


LAYER_CASE = {"K": 128, "N": 48, "r": 3, "alpha": 6.0,
              "W": random_tensor(48, 128, seed=21, scale=128 ** -0.5, dtype=torch.bfloat16),
              "A": random_tensor(3, 128, seed=22, scale=0.1, dtype=torch.bfloat16),
              "B": random_tensor(48, 3, seed=23, scale=0.1, dtype=torch.bfloat16),
              "x": random_tensor(5, 128, seed=24, dtype=torch.bfloat16)}


@pytest.mark.points(2)
def test_layer_output_within_nf4_error_and_no_dense_weight_kept(student):
    """One QLoRA layer: its output is within NF4's error of the bf16 layer's (each weight is off by at most half a
    gap of the NF4 table times its block's absmax, plus the scales' own 8-bit error), it equals the dequantized
    layer's, dL/dx flows through the NF4 weight, and forward keeps no dense (N, K) copy of it for backward."""
    case = LAYER_CASE
    got = student.run(qlora_layer, case)
    x, W = case["x"].double(), case["W"].double()
    A, B, s = case["A"].double(), case["B"].double(), case["alpha"] / case["r"]
    y_bf16 = x @ W.t() + s * (x @ A.t()) @ B.t()
    absmax = W.reshape(case["N"], -1, 64).abs().amax(dim=-1, keepdim=True)  # (N, K / 64, 1)
    weight_error = (NF4_TABLE_MAX_HALF_GAP + 0.01) * absmax + absmax.max() / 127  # the scales' 8-bit error
    weight_error = weight_error.expand(-1, -1, 64).reshape(case["N"], case["K"])
    bound = x.abs() @ weight_error.t() + 2e-2 * y_bf16.abs() + 1e-2
    excess = (got["y"].double() - y_bf16).abs() - bound
    assert (excess <= 0).all(), (
        f"QLoRA layer: output differs from the bf16 layer's by more than NF4's error at {int((excess > 0).sum())} of "
        f"{excess.numel()} elements (worst excess {excess.max().item():.3g}) on {describe(x=case['x'])}")
    assert not torch.equal(got["y"].double(), y_bf16.to(torch.bfloat16).double()), "QLoRA layer: nothing was quantized"
    W_nf4 = _dequantized(case["W"]).double()
    xg = x.clone().requires_grad_(True)
    y = xg @ W_nf4.t() + s * (xg @ A.t()) @ B.t()
    y.to(torch.bfloat16).double().square().sum().backward()
    check_close(got["y"], y.detach(), name="QLoRA layer: output vs the dequantized layer",
                inputs=describe(x=case["x"]), dtype=torch.bfloat16)
    error = ((got["dx"].double() - xg.grad).norm() / xg.grad.norm()).item()
    assert error < 3e-2, f"QLoRA layer: dL/dx off by {error:.2e} (relative norm) from the dequantized layer's"
    dense = [numel for numel, _ in got["saved"] if numel >= case["N"] * case["K"]]
    assert not dense, (
        f"QLoRA layer: forward saved tensors of {dense} elements for backward, the size of the dequantized "
        f"({case['N']}, {case['K']}) weight: dequantize again in backward instead of keeping it")
    total = sum(nbytes for _, nbytes in got["saved"])
    assert total <= 2 * 5 * (case["K"] + case["r"]) * 2, (
        f"QLoRA layer: forward saved {total} bytes for a (5, {case['K']}) bf16 input; x and h = x A^T "
        f"({2 * 5 * (case['K'] + case['r'])} bytes) are all backward needs")


@pytest.mark.points(2)
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_weight_bytes_are_the_packed_sizes(student, name):
    """weight_bytes counts NF4 weights at torchao's packed size (4-bit codes, int8 scales, second-level constants,
    mean, table) and every other parameter at numel * element size."""
    config = MODEL_CASES[name]
    got = student.run(qlora_step, config, 4)
    model = hf_models.llama(dtype=torch.bfloat16, **hf_models.LLAMA_NF4)
    linear = set(_linear_names(model))
    expected = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if n.removesuffix(".weight") not in linear)
    expected += sum(_nf4_bytes(model.get_submodule(n).weight) for n in linear)
    adapters = sum(got["grads"][n].numel() * 2 for n in got["grads"])  # bf16 adapters
    assert got["weight_bytes"] == expected + adapters, (
        f"weight_bytes after apply_qlora ({name}) = {got['weight_bytes']:,}, expected {expected + adapters:,} "
        f"({expected:,} for the model with NF4 linears, {adapters:,} for the adapters)")


@pytest.mark.points(2)
@pytest.mark.parametrize("shape, block_size, dtype", [((32, 64), 32, torch.bfloat16), ((40, 64), 64, torch.float32),
                                                      ((24, 192), 64, torch.bfloat16)])
def test_quantize_nf4_weight(student, shape, block_size, dtype):
    """quantize_nf4_weight: a frozen nn.Parameter holding torchao's NF4 of the weight, blocks of block_size along K,
    the second-level block the gcd of the scale count and 256; it dequantizes to torchao's values exactly."""
    weight = random_tensor(*shape, seed=sum(shape), dtype=dtype)
    got = student.run(quantized_weight, weight, block_size)
    assert got["is_parameter"] and got["quantized"] and not got["requires_grad"] and got["shape"] == shape, (
        f"quantize_nf4_weight({shape}): expected a frozen nn.Parameter holding an NF4 tensor of shape {shape}, got "
        f"parameter={got['is_parameter']}, quantized={got['quantized']}, requires_grad={got['requires_grad']}, "
        f"shape {got['shape']}")
    check_close(got["dense"], _dequantized(weight, block_size).to(dtype), name="quantize_nf4_weight (dequantized)",
                inputs=describe(weight=weight, block_size=block_size), rtol=0, atol=0)


def quantize_bad(kind: str) -> None:
    from lab06_lora.qlora import NF4Config, quantize_nf4_weight

    weight = {"ragged": torch.ones(4, 48), "vector": torch.ones(64), "integer": torch.ones(4, 64, dtype=torch.int32)}
    quantize_nf4_weight(weight[kind], config=NF4Config(block_size=32))


@pytest.mark.points(1)
@pytest.mark.parametrize("kind, error", [("ragged", ValueError), ("vector", TypeError), ("integer", TypeError)])
def test_quantize_nf4_weight_refuses_bad_weights(student, kind, error):
    """in_features not a multiple of block_size: ValueError; not a 2-D floating-point weight: TypeError."""
    with pytest.raises(error):
        student.run(quantize_bad, kind)


@pytest.mark.points(1)
def test_merge_into_nf4_is_refused(student):
    with pytest.raises(TypeError, match="NF4|quantized"):
        student.run(merge_nf4)
