"""Lab 06, part 4: the memory arithmetic (memory.py): parameter counts, NF4 bytes, and the predicted bytes of
weights, gradients, Adam state and activations, against a real training step measured here in the grader (HF
transformers, peft for LoRA, torchao's NF4 with peft for QLoRA) and against HF's own parameter counts at 1B and 7B.
"""

import math

import hf_models
import pytest
import torch

from common.testing import describe

SHAPE_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                num_kv_heads=4)
SHAPE_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                num_kv_heads=32)
SHAPE_ODD = dict(vocab_size=300, hidden_size=96, intermediate_size=200, num_layers=3, num_heads=6, num_kv_heads=3)
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)

# -----------------------------------------------------------------------------
# Producers: run in the worker


def _shape(fields: dict):
    from lab06_lora.memory import LlamaShape

    return LlamaShape(**fields)


def parameter_counts(shapes: list[dict], configs: list[dict]) -> dict:
    """parameter_count of each shape, and lora_parameter_count of each (shape, config) pair."""
    from lab06_lora.lora import LoRAConfig
    from lab06_lora.memory import lora_parameter_count, parameter_count

    return {"total": [parameter_count(_shape(s)) for s in shapes],
            "lora": [[lora_parameter_count(_shape(s), LoRAConfig(**c)) for c in configs] for s in shapes]}


def nf4_sizes(shapes: list[tuple[int, int]], dtype: torch.dtype) -> list[int]:
    from lab06_lora.memory import nf4_weight_bytes
    from lab06_lora.qlora import NF4Config

    return [nf4_weight_bytes(k, n, nf4=NF4Config(), dtype=dtype) for k, n in shapes]


def predicted(shape: dict, method: str, config: dict | None, dtype: torch.dtype, batch_size: int, seq_len: int,
              device: str = "cpu") -> dict:
    from lab06_lora.lora import LoRAConfig
    from lab06_lora.memory import predict_memory

    result = predict_memory(_shape(shape), method=method, batch_size=batch_size, seq_len=seq_len,
                            config=None if config is None else LoRAConfig(**config), dtype=dtype, device=device)
    return {"weights": result.weights, "gradients": result.gradients, "optimizer": result.optimizer,
            "activations": result.activations}


def predict_bad(case: str) -> None:
    from lab06_lora.lora import LoRAConfig
    from lab06_lora.memory import predict_memory

    config = {"method": None, "config": None, "o_proj only": LoRAConfig(r=2, target_modules=("o_proj",)),
              "regex": LoRAConfig(r=2, target_modules=r".*q_proj")}[case]
    method = "adapters" if case == "method" else "lora"
    predict_memory(_shape(SMALL), method=method, batch_size=1, seq_len=4, config=config)


# -----------------------------------------------------------------------------
# The grader's measurement: a real step of a HF model (peft for the adapters)


def _is_nf4(tensor) -> bool:
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter)


def _nf4_size(tensor) -> int:
    parts = (tensor.quantized_data, tensor.quantized_scalers, tensor.quantization_factor, tensor.scaler_mean, tensor.nf4)
    return sum(t.numel() * t.element_size() for t in parts)


def _measured_step(model, ids: torch.Tensor) -> dict:
    """Bytes of weights, gradients, AdamW's two moments, and the distinct non-parameter storages autograd saves."""
    params = [*model.parameters()]
    weights = sum(_nf4_size(p) if _is_nf4(p) else p.numel() * p.element_size() for p in params)
    known = {t.untyped_storage().data_ptr() for t in [*params, *model.buffers()] if not _is_nf4(t)}
    storages = {}

    def pack(tensor):
        if not _is_nf4(tensor) and tensor.untyped_storage().data_ptr() not in known:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return {"weights": weights, "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params
                                                  if p.grad is not None),
            "optimizer": sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values()
                             for k in ("exp_avg", "exp_avg_sq")),
            "activations": sum(storages.values())}


def _measured(method: str, config: dict | None, dtype: torch.dtype, batch_size: int, seq_len: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    torch.manual_seed(0)
    model = hf_models.llama(dtype=dtype, **_hf_fields(SMALL))
    if method == "qlora":
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                weight = module.weight.detach()
                module.weight = torch.nn.Parameter(to_nf4(weight, 64, math.gcd(weight.numel() // 64, 256)),
                                                   requires_grad=False)
    if method != "full":
        targets = config["target_modules"]
        model = get_peft_model(model, LoraConfig(r=config["r"], lora_dropout=config.get("dropout", 0.0),
                                                 target_modules=targets if isinstance(targets, str) else list(targets)),
                               autocast_adapter_dtype=config.get("adapter_dtype") == torch.float32)
    model.train()
    return _measured_step(model, hf_models.tokens(batch_size=batch_size, seq_len=seq_len))


def _hf_fields(shape: dict) -> dict:
    return dict(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"])


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _hf_parameter_count(shape: dict) -> int:
    """Parameters of the HF Llama of this shape, built on the meta device (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**_hf_fields(shape)))
    return sum(p.numel() for p in model.parameters())


LORA_CONFIGS = [dict(r=8, target_modules=("q_proj", "v_proj")), dict(r=16, target_modules="all-linear"),
                dict(r=3, target_modules=("k_proj", "mlp.down_proj", "gate_proj"))]


def _lora_count(shape: dict, config: dict) -> int:
    """r (K + N) per adapted linear per layer, written out for a Llama."""
    C, F = shape["hidden_size"], shape["intermediate_size"]
    G = shape["num_kv_heads"] * C // shape["num_heads"]
    sizes = {"q_proj": C + C, "k_proj": C + G, "v_proj": C + G, "o_proj": C + C, "gate_proj": C + F,
             "up_proj": C + F, "down_proj": F + C}
    targets = config["target_modules"]
    chosen = sizes if targets == "all-linear" else [n for n in sizes if any(t.split(".")[-1] == n for t in targets)]
    return shape["num_layers"] * config["r"] * sum(sizes[n] for n in chosen)


@pytest.mark.points(2)
def test_parameter_counts_equal_hf_and_peft(student):
    """parameter_count equals the HF model's count (1B, 7B, an odd shape); lora_parameter_count equals r (K + N) per
    adapted linear, and peft's trainable count on a real small model."""
    shapes = [SHAPE_1B, SHAPE_7B, SHAPE_ODD, SMALL]
    got = student.run(parameter_counts, shapes, LORA_CONFIGS)
    for shape, count in zip(shapes, got["total"]):
        assert type(count) is int, f"parameter_count returned a {type(count).__name__}, not an int"
        want = _hf_parameter_count(shape)
        assert count == want, f"parameter_count({shape}) = {count:,}, the HF model has {want:,}"
    for shape, row in zip(shapes, got["lora"]):
        for config, count in zip(LORA_CONFIGS, row):
            want = _lora_count(shape, config)
            assert count == want, f"lora_parameter_count({shape}, {config}) = {count:,}, expected {want:,}"
    from peft import LoraConfig, get_peft_model

    for config, count in zip(LORA_CONFIGS, got["lora"][3]):
        targets = config["target_modules"]
        model = get_peft_model(hf_models.llama(**_hf_fields(SMALL)), LoraConfig(
            r=config["r"], target_modules=targets if isinstance(targets, str) else list(targets)))
        assert count == model.get_nb_trainable_parameters()[0], (
            f"lora_parameter_count({SMALL}, {config}) = {count}, peft trains {model.get_nb_trainable_parameters()[0]}")


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_bytes_equal_torchao(student, dtype):
    """nf4_weight_bytes(K, N) equals what torchao's NF4Tensor of a (N, K) weight occupies (second-level blocks of
    gcd(scales, 256) when 256 does not divide the scale count)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    shapes = [(64, 64), (128, 96), (64, 40), (192, 24), (2048, 256)]
    got = student.run(nf4_sizes, shapes, dtype)
    for (k, n), size in zip(shapes, got):
        assert type(size) is int, f"nf4_weight_bytes(in {k}, out {n}) returned a {type(size).__name__}, not an int"
        weight = torch.randn(n, k).to(dtype)
        want = _nf4_size(to_nf4(weight, 64, math.gcd(n * k // 64, 256)))
        assert size == want, f"nf4_weight_bytes(in {k}, out {n}, {dtype}) = {size}, torchao's NF4 holds {want} bytes"


MEASURED_CASES = {
    "full, fp32": ("full", None, torch.float32),
    "full, bf16": ("full", None, torch.bfloat16),
    "LoRA all-linear, fp32": ("lora", dict(r=4, target_modules="all-linear"), torch.float32),
    "LoRA q/v, dropout 0.1, bf16": ("lora", dict(r=3, target_modules=("q_proj", "v_proj"), dropout=0.1),
                                    torch.bfloat16),
    "LoRA all-linear, fp32 adapters on bf16 (peft's default)": (
        "lora", dict(r=2, target_modules="all-linear", adapter_dtype=torch.float32), torch.bfloat16),
    "LoRA k/down/gate, bf16": ("lora", dict(r=5, target_modules=("k_proj", "down_proj", "gate_proj")),
                               torch.bfloat16),
    "QLoRA all-linear, bf16": ("qlora", dict(r=4, target_modules="all-linear"), torch.bfloat16),
    "QLoRA q/v, dropout 0.05, bf16": ("qlora", dict(r=2, target_modules=("q_proj", "v_proj"), dropout=0.05),
                                      torch.bfloat16),
}


@pytest.mark.points(5)
@pytest.mark.parametrize("name", list(MEASURED_CASES))
def test_predictions_equal_a_measured_step(student, name):
    """predict_memory (device "cpu") equals, byte for byte, a real step of a HF Llama measured here: weights,
    gradients, AdamW's moments, and the activations autograd saved."""
    method, config, dtype = MEASURED_CASES[name]
    got = student.run(predicted, SMALL, method, config, dtype, 2, 12)
    want = _measured(method, config, dtype, 2, 12)
    for key in ("weights", "gradients", "optimizer", "activations"):
        assert type(got[key]) is int, f"predict_memory ({name}) {key} is a {type(got[key]).__name__}, not an int"
        assert got[key] == want[key], (
            f"predict_memory ({name}) {key}: {got[key]:,} bytes, a measured step holds {want[key]:,} (off by "
            f"{got[key] - want[key]:+,}) on {describe(shape=SMALL, batch_size=2, seq_len=12)}")


def _nf4_formula(numel: int, itemsize: int) -> int:
    """NF4 bytes when 256 divides the scale count (every 1B and 7B layer)."""
    return numel // 2 + numel // 64 + itemsize * (numel // (64 * 256) + 17)


@pytest.mark.points(2)
@pytest.mark.parametrize("size", ["1b", "7b"])
def test_weights_gradients_and_moments_at_scale(student, size):
    """At 1B and 7B (bf16, LoRA and QLoRA r16 all-linear, B1 N2048): weights, gradients and Adam state from the
    parameter counts, NF4 at its packed size."""
    shape = {"1b": SHAPE_1B, "7b": SHAPE_7B}[size]
    config = dict(r=16, alpha=32.0, target_modules="all-linear")
    total = _hf_parameter_count(shape)
    adapters = _lora_count(shape, config)
    C, F, L = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    G = shape["num_kv_heads"] * C // shape["num_heads"]
    linears = [C * C, C * G, C * G, C * C, C * F, C * F, F * C]
    nf4 = L * sum(_nf4_formula(n, 2) for n in linears)
    want = {"full": (2 * total, 2 * total, 4 * total),
            "lora": (2 * total + 2 * adapters, 2 * adapters, 4 * adapters),
            "qlora": (2 * (total - L * sum(linears)) + nf4 + 2 * adapters, 2 * adapters, 4 * adapters)}
    for method, (weights, gradients, optimizer) in want.items():
        got = student.run(predicted, shape, method, None if method == "full" else config, torch.bfloat16, 1, 2048,
                          "cuda")
        assert (got["weights"], got["gradients"], got["optimizer"]) == (weights, gradients, optimizer), (
            f"predict_memory({size}, {method}): weights/gradients/optimizer = {got['weights']:,} / "
            f"{got['gradients']:,} / {got['optimizer']:,} bytes, expected {weights:,} / {gradients:,} / {optimizer:,}")
        assert got["activations"] > 0


@pytest.mark.points(1)
@pytest.mark.parametrize("case, match", [("method", "method"), ("config", "LoRAConfig"),
                                         ("o_proj only", "q_proj"), ("regex", "all-linear")])
def test_predict_memory_refuses_what_it_cannot_model(student, case, match):
    """An unknown method, LoRA without a config, adapters on none of q/k/v, or a regular-expression target:
    ValueError."""
    with pytest.raises(ValueError, match=match):
        student.run(predict_bad, case)
