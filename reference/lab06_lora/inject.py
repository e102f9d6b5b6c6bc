"""Injecting LoRA into a HF transformers model, counting what trains, and adapters in peft's file format.

What it saves: only the adapters train and only they are stored: a checkpoint of r (N + K) numbers per adapted layer
instead of the whole model (Hu et al. 2021, arXiv:2106.09685, Section 4.2: "we only need to store and load a small
number of task-specific parameters").

1. Every parameter of the model is frozen; each module named by `LoRAConfig.target_modules` is replaced in its
   parent by a LoRALinear around it. The patterns follow peft's rules: a list of names matches a module whose name
   equals one or ends with "." + one; "all-linear" is every nn.Linear / Conv1D except the output layer; another
   single string is a regular expression that must match the whole module name.
2. Counting follows peft's print_trainable_parameters: "trainable params: 7,424 || all params: 101,952 ||
   trainable%: 7.2819" (all params include the adapters).
3. Files follow peft's adapter format, so `PeftModel.from_pretrained(base, directory)` loads what save_adapter wrote
   and load_adapter reads what peft's save_pretrained wrote:
       adapter_model.safetensors   "base_model.model.<module name>.lora_A.weight" (r, K) and ".lora_B.weight" (N, r)
       adapter_config.json         {"peft_type": "LORA", "r": ..., "lora_alpha": ..., "target_modules": [...], ...}

Usage:
    model = apply_lora(LlamaForCausalLM(config), config=LoRAConfig(r=8, target_modules="all-linear"))
    print(trainable_parameters_report(model))
    save_adapter(model, "adapter/", config=lora_config)
    model = load_adapter(LlamaForCausalLM(config), "adapter/")
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from .lora import LoRAConfig, LoRALinear, _is_linear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (LoraModel) .model (the HF model)

# -----------------------------------------------------------------------------
# Public entry points


def apply_lora(model: nn.Module, *, config: LoRAConfig) -> nn.Module:
    """Freeze `model` and wrap every target module in a LoRALinear, in place.

    Args:
        model: a HF transformers model (or any nn.Module with named linear layers).
        config: the adapters: rank, scale, dropout, target_modules.

    Returns:
        The same model object, now holding LoRALinear layers; only their lora_A and lora_B train.

    Raises:
        ValueError: no module matches target_modules (the message lists the model's module names).
        TypeError: a matched module is not a linear layer.
    """
    # BEGIN SOLUTION
    targets = find_targets(model, config.target_modules)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, LoRALinear(parent.get_submodule(child_name), config=config))
    return model
    # END SOLUTION


def find_targets(model: nn.Module, target_modules: tuple[str, ...] | str) -> list[str]:
    """Names of the modules that `target_modules` selects, in the model's module order.

    Raises:
        ValueError: nothing matches; the message lists the model's module names (their last components).
        TypeError: a matched module is not nn.Linear / Conv1D.
    """
    # BEGIN SOLUTION
    if target_modules == "all-linear":
        output_layer = _output_layer(model)
        names = [name for name, module in model.named_modules() if _is_linear(module) and module is not output_layer]
    else:
        names = [name for name, _ in model.named_modules() if name and _matches(name, target_modules)]
    if not names:
        known = sorted({name.rpartition(".")[2] for name, _ in model.named_modules() if name})
        raise ValueError(f"target_modules {target_modules!r} match no module of {type(model).__name__}; "
                         f"its modules are named: {', '.join(known)}")
    for name in names:
        module = model.get_submodule(name)
        if not _is_linear(module):
            raise TypeError(f"target module {name} is a {type(module).__name__}, not a linear layer: LoRA here "
                            "adapts nn.Linear and Conv1D layers only")
    return names
    # END SOLUTION


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> LoRALinear, for every adapted layer of the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, as peft's get_nb_trainable_parameters (a quantized weight counts as the
    number of weights it stands for)."""
    # BEGIN SOLUTION
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total
    # END SOLUTION


def trainable_parameters_report(model: nn.Module) -> str:
    """peft's print_trainable_parameters line: "trainable params: 7,424 || all params: 101,952 || trainable%: 7.2819"."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under peft's keys: "base_model.model.<name>.lora_A.weight" (r, K) and ".lora_B.weight" (N, r)."""
    # BEGIN SOLUTION
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state
    # END SOLUTION


def save_adapter(model: nn.Module, directory: str | Path, *, config: LoRAConfig) -> Path:
    """Write adapter_model.safetensors and adapter_config.json (peft's format) into `directory`.

    Returns:
        The directory.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear layers (call apply_lora first)")
    directory.mkdir(parents=True, exist_ok=True)
    # BEGIN SOLUTION
    state = {key: tensor.contiguous() for key, tensor in adapter_state_dict(model).items()}
    save_file(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "bias": "none",
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.rank_stabilized, "target_modules": sorted(layers),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    # END SOLUTION
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return directory


def load_adapter(model: nn.Module, directory: str | Path, *, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Read a peft LoRA adapter (ours or peft's) and apply it to `model`, in place.

    Args:
        model: the base model, without adapters.
        directory: holds adapter_config.json and adapter_model.safetensors.
        adapter_dtype: dtype of the loaded adapters (None: the base weights' dtype).

    Returns:
        The model with LoRALinear layers holding the saved A and B.

    Raises:
        ValueError: not a LoRA adapter, an option this lab does not implement (per-module ranks, biases, DoRA),
            or weights that do not fit the model (missing, unexpected or misshapen keys).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    # BEGIN SOLUTION
    if saved.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: peft_type is {saved.get('peft_type')!r}, not 'LORA'")
    unsupported = {key: saved[key] for key in ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "bias",
                                                "layers_to_transform", "modules_to_save", "exclude_modules")
                   if saved.get(key) not in (None, False, {}, [], "none")}
    if unsupported:
        raise ValueError(f"{directory}: adapter options this lab does not implement: {unsupported}")
    targets = saved["target_modules"]
    config = LoRAConfig(r=saved["r"], alpha=saved["lora_alpha"], dropout=saved.get("lora_dropout", 0.0),
                        rank_stabilized=saved.get("use_rslora", False), adapter_dtype=adapter_dtype,
                        target_modules=targets if isinstance(targets, str) else tuple(targets))
    apply_lora(model, config=config)
    state = load_file(directory / ADAPTER_WEIGHTS)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory}: adapter weights do not fit the model: missing {_some(missing)}, "
                         f"unexpected {_some(unexpected)}")
    with torch.no_grad():
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape:
                raise ValueError(f"{directory}: {key} has shape {tuple(state[key].shape)}, the model's is "
                                 f"{tuple(tensor.shape)}")
            tensor.copy_(state[key])  # a view of the parameter: the copy lands in the layer
    return model
    # END SOLUTION


# -----------------------------------------------------------------------------
# Helpers


def _matches(name: str, target_modules: tuple[str, ...] | str) -> bool:
    """peft's rule: a string is a regular expression over the whole name; a list matches the name or a suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _some(names: list[str]) -> str:
    """The first few names of a list, for an error message."""
    return f"{names[:4]}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The layer producing the logits (a HF model's get_output_embeddings()), which "all-linear" leaves alone."""
    get_output = getattr(model, "get_output_embeddings", None)
    return get_output() if callable(get_output) else None
