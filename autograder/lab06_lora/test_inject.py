"""Lab 06, part 2: injecting LoRA into HF models (inject.py), checked against peft, which runs here in the grader: the
same model, config and adapter values must give peft's logits, loss and gradients; the same parameter counts; and
adapter files that peft loads, as the lab loads peft's.
"""

import json
from pathlib import Path

import hf_models
import pytest
import torch

from common.testing import check_all_close, check_close, describe

# -----------------------------------------------------------------------------
# Producers: run in the worker


def _lora_layers(model) -> dict:
    from lab06_lora.lora import LoRALinear

    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _set_adapters(model, seed: int) -> None:
    layers = _lora_layers(model)
    shapes = {n: (tuple(m.lora_A.weight.shape), tuple(m.lora_B.weight.shape)) for n, m in layers.items()}
    with torch.no_grad():
        for name, (a, b) in hf_models.adapter_values(shapes, seed=seed).items():
            layers[name].lora_A.weight.copy_(a)
            layers[name].lora_B.weight.copy_(b)


def injected_step(kind: str, config: dict, seed: int) -> dict:
    """apply_lora on a seeded HF model, seeded adapter values, one forward and backward."""
    from lab06_lora.inject import apply_lora
    from lab06_lora.lora import LoRAConfig

    model = apply_lora(hf_models.model(kind), config=LoRAConfig(**config))
    _set_adapters(model, seed)
    ids = hf_models.tokens()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "layers": sorted(_lora_layers(model)),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}


def counts(kind: str, config: dict) -> dict:
    from lab06_lora.inject import apply_lora, count_parameters, trainable_parameters_report
    from lab06_lora.lora import LoRAConfig

    model = apply_lora(hf_models.model(kind), config=LoRAConfig(**config))
    return {"counts": tuple(count_parameters(model)), "report": trainable_parameters_report(model)}


def apply_with(kind: str, config: dict) -> list[str]:
    from lab06_lora.inject import apply_lora
    from lab06_lora.lora import LoRAConfig

    return sorted(_lora_layers(apply_lora(hf_models.model(kind), config=LoRAConfig(**config))))


def saved_adapter_files(kind: str, config: dict, seed: int) -> dict[str, bytes]:
    """save_adapter's files (name -> bytes) for a model with seeded adapters."""
    import tempfile

    from lab06_lora.inject import apply_lora, save_adapter
    from lab06_lora.lora import LoRAConfig

    lora_config = LoRAConfig(**config)
    model = apply_lora(hf_models.model(kind), config=lora_config)
    _set_adapters(model, seed)
    directory = Path(tempfile.mkdtemp())
    save_adapter(model, directory, config=lora_config)
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def load_adapter_files(kind: str, files: dict[str, bytes]) -> dict:
    """load_adapter on files written by peft: the logits of the adapted model and what trains."""
    import tempfile

    from lab06_lora.inject import load_adapter

    directory = Path(tempfile.mkdtemp())
    for name, data in files.items():
        (directory / name).write_bytes(data)
    model = load_adapter(hf_models.model(kind), directory)
    with torch.no_grad():
        logits = model(input_ids=hf_models.tokens()).logits
    return {"logits": logits, "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}


# -----------------------------------------------------------------------------
# peft, in the grader


def _peft_config(config: dict):
    from peft import LoraConfig

    targets = config["target_modules"]
    return LoraConfig(r=config["r"], lora_alpha=config.get("alpha", 8.0), lora_dropout=0.0,
                      use_rslora=config.get("rank_stabilized", False),
                      target_modules=targets if isinstance(targets, str) else list(targets))


def _peft_model(kind: str, config: dict, seed: int | None = None):
    from peft import get_peft_model

    model = get_peft_model(hf_models.model(kind), _peft_config(config))
    if seed is not None:
        hf_models.set_peft_adapters(model, seed=seed)
    return model


def _peft_step(kind: str, config: dict, seed: int) -> dict:
    model = _peft_model(kind, config, seed)
    ids = hf_models.tokens()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": hf_models.peft_gradients(model),
            "layers": sorted(hf_models.peft_layers(model))}


# -----------------------------------------------------------------------------
# Tests: run in the grader

STEP_CASES = {
    "Llama, q/v (peft's default targets)": ("llama", dict(r=4, alpha=12.0, target_modules=("q_proj", "v_proj"))),
    "Llama, all-linear": ("llama", dict(r=3, alpha=5.0, target_modules="all-linear")),
    "GPT-2 (Conv1D), all-linear, rsLoRA": ("gpt2", dict(r=5, alpha=4.0, target_modules="all-linear",
                                                         rank_stabilized=True)),
}


@pytest.mark.points(5)
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_same_logits_loss_and_gradients_as_peft(student, name):
    """apply_lora and peft's get_peft_model on the same seeded model, same config and same adapter values: equal
    logits, loss and adapter gradients (float64, dropout off), on the same layers; nothing else trains."""
    kind, config = STEP_CASES[name]
    got = student.run(injected_step, kind, config, 3)
    want = _peft_step(kind, config, 3)
    inputs = describe(model=name, **config)
    assert got["layers"] == want["layers"], (
        f"apply_lora ({name}) adapted {got['layers']}, peft adapts {want['layers']}")
    check_close(got["logits"], want["logits"], name=f"apply_lora ({name}): logits", inputs=inputs)
    check_close(got["loss"], want["loss"], name=f"apply_lora ({name}): loss", inputs=inputs)
    check_all_close(got["grads"], want["grads"], name=f"apply_lora ({name}): gradients", inputs=inputs)
    assert got["trainable"] == sorted(want["grads"]), (
        f"apply_lora ({name}): the trainable parameters are {got['trainable'][:4]}..., expected only the adapters")


COUNT_CASES = {
    "Llama q/v r4": ("llama", dict(r=4, target_modules=("q_proj", "v_proj"))),
    "Llama all-linear r8": ("llama", dict(r=8, target_modules="all-linear")),
    "Llama mlp.down_proj, k_proj r3": ("llama", dict(r=3, target_modules=("mlp.down_proj", "k_proj"))),
    "GPT-2 c_attn r2": ("gpt2", dict(r=2, target_modules=("c_attn",))),
    "Llama regex r5": ("llama", dict(r=5, target_modules=r"model\.layers\.1\..*_proj")),
}


@pytest.mark.points(3)
@pytest.mark.parametrize("name", list(COUNT_CASES))
def test_parameter_counts_and_targets_equal_peft(student, name):
    """count_parameters equals peft's get_nb_trainable_parameters, the report reads like print_trainable_parameters,
    and the adapted layers are peft's (suffix lists, 'all-linear' without the output layer, regular expressions)."""
    kind, config = COUNT_CASES[name]
    got = student.run(counts, kind, config)
    model = _peft_model(kind, config)
    trainable, total = model.get_nb_trainable_parameters()
    assert tuple(got["counts"]) == (trainable, total), (
        f"count_parameters ({name}) returned {got['counts']}, peft counts (trainable, all) = {(trainable, total)}")
    report = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert got["report"] == report, f"trainable_parameters_report ({name}) returned {got['report']!r}, expected {report!r}"
    layers = student.run(apply_with, kind, config)
    assert layers == sorted(hf_models.peft_layers(model)), (
        f"apply_lora ({name}) adapted {layers}, peft adapts {sorted(hf_models.peft_layers(model))}")


@pytest.mark.points(2)
@pytest.mark.parametrize("targets", [("nope",), ("proj",), "q_pro", ("self_attn.q",)])
def test_a_pattern_matching_nothing_lists_the_module_names(student, targets):
    """A pattern that matches no module (names match whole, or by a '.'-separated suffix) is a ValueError that
    lists the model's module names."""
    with pytest.raises(ValueError) as error:
        student.run(apply_with, "llama", dict(r=2, target_modules=targets))
    message = str(error.value)
    for name in ("q_proj", "down_proj", "embed_tokens", "lm_head"):
        assert name in message, f"apply_lora({targets!r}): the error should list the module names, got: {message}"


@pytest.mark.points(1)
@pytest.mark.parametrize("targets, kind", [(("mlp",), "LlamaMLP"), (("embed_tokens",), "Embedding"),
                                           (r"model\.norm", "LlamaRMSNorm")])
def test_a_non_linear_target_is_refused(student, targets, kind):
    """A matched module that is not a linear layer is a TypeError naming its type."""
    with pytest.raises(TypeError, match=kind):
        student.run(apply_with, "llama", dict(r=2, target_modules=targets))


SAVE_CASES = {
    "Llama all-linear": ("llama", dict(r=3, alpha=6.0, target_modules="all-linear")),
    "GPT-2 c_attn/c_fc, rsLoRA": ("gpt2", dict(r=2, alpha=3.0, target_modules=("c_attn", "c_fc"),
                                               rank_stabilized=True)),
}


@pytest.mark.points(3)
@pytest.mark.parametrize("name", list(SAVE_CASES))
def test_peft_loads_what_save_adapter_wrote(student, name, tmp_path):
    """save_adapter writes adapter_model.safetensors and adapter_config.json; PeftModel.from_pretrained loads them on
    a base model saved and reloaded here, and gives the logits of peft's own model with the same adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kind, config = SAVE_CASES[name]
    files = student.run(saved_adapter_files, kind, config, 5)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(files), (
        f"save_adapter ({name}) wrote {sorted(files)}, expected adapter_model.safetensors and adapter_config.json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file_name, data in files.items():
        (adapter / file_name).write_bytes(data)
    saved = json.loads(files["adapter_config.json"])
    assert saved.get("peft_type") == "LORA" and saved.get("r") == config["r"], (
        f"save_adapter ({name}): adapter_config.json has peft_type {saved.get('peft_type')!r}, r {saved.get('r')!r}")
    hf_models.model(kind).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float64)
    loaded = PeftModel.from_pretrained(base, adapter)
    ids = hf_models.tokens()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = _peft_model(kind, config, 5)(input_ids=ids).logits
    check_close(got, want, name=f"PeftModel.from_pretrained on save_adapter's files ({name}): logits",
                inputs=describe(**config))


@pytest.mark.points(3)
@pytest.mark.parametrize("name", list(SAVE_CASES))
def test_load_adapter_reads_what_peft_saved(student, name, tmp_path):
    """peft's save_pretrained writes an adapter; load_adapter applies it to a fresh model: peft's logits, and only the
    adapters train."""
    kind, config = SAVE_CASES[name]
    model = _peft_model(kind, config, 7)
    model.save_pretrained(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".json", ".safetensors")}
    got = student.run(load_adapter_files, kind, files)
    with torch.no_grad():
        want = model(input_ids=hf_models.tokens()).logits
    check_close(got["logits"], want, name=f"load_adapter on peft's files ({name}): logits", inputs=describe(**config))
    assert got["trainable"] == hf_models.peft_trainable(model), (
        f"load_adapter ({name}): trainable parameters {got['trainable'][:4]}..., expected the adapters only")


@pytest.mark.points(1)
@pytest.mark.parametrize("damage, match", [("peft_type", "LORA"), ("missing weight", "missing")])
def test_load_adapter_refuses_what_does_not_fit(student, damage, match, tmp_path):
    """Another kind of adapter (peft_type not LORA), or weights missing from the file: ValueError."""
    from safetensors.torch import load_file, save_file

    model = _peft_model("llama", dict(r=2, target_modules=("q_proj", "v_proj")), 1)
    model.save_pretrained(tmp_path)
    config_path, weights_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    if damage == "peft_type":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "IA3"}))
    else:
        state = load_file(weights_path)
        state.pop(sorted(state)[0])
        save_file(state, weights_path)
    files = {p.name: p.read_bytes() for p in (config_path, weights_path)}
    with pytest.raises(ValueError, match=match):
        student.run(load_adapter_files, "llama", files)
